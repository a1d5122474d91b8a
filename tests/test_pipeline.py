"""pf.pipeline: one compatibility check for every model/sampler pair (a one-line error naming
both), pictures equal to running the sampler and the decoder by hand, and the three entry
points (``pf.sample``, ``pf.eval``, the text-to-image study) drawing through it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from model_helpers import TINY, tiny_model
from pf import pipeline, samplers
from pf.autoencoder import Decoder, to_uint8
from pf.conditioning import TextCond
from pf.models import GlobalTimeDiT, PatchForcingDiT, PatchForcingT2I, REPAGlobalTimeDiT, REPAPatchForcingDiT
from pf.models.checkpoint import model_checkpoint, save_checkpoint
from pf.pipeline import Pipeline, check_compatible

REPA = dict(z_dim=8, encoder_depth=1, projector_dim=16)
T2I = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, head_dim=16, text_dim=12,
           text_head_dim=8, cond_width=8)

# name: (build, the times it moves, whether it has a difficulty head); built small, weights as initialised
MODELS = {
    "PatchForcingDiT": (lambda: PatchForcingDiT(**TINY), "per-patch", True),
    "PatchForcingDiT without a difficulty head": (lambda: PatchForcingDiT(**TINY, predict_uncertainty=False),
                                                   "per-patch", False),
    "REPAPatchForcingDiT": (lambda: REPAPatchForcingDiT(**TINY, **REPA), "per-patch", True),
    "GlobalTimeDiT": (lambda: GlobalTimeDiT(**TINY), "global", False),
    "REPAGlobalTimeDiT": (lambda: REPAGlobalTimeDiT(**TINY, **REPA), "global", False),
    "PatchForcingT2I": (lambda: PatchForcingT2I(**T2I), "per-patch", True),
}
# what each sampler needs, written out here (not read from the samplers)
SAMPLERS = {"euler": ("global", False), "euler_pf": ("per-patch", False), "dual_loop": ("per-patch", True),
            "look_ahead": ("per-patch", True), "heun": ("global", False), "sde": ("global", False)}


@pytest.mark.parametrize("model_name,sampler_name", list(itertools.product(MODELS, SAMPLERS)))
def test_every_model_and_sampler_pair(model_name, sampler_name):
    build, times, has_head = MODELS[model_name]
    needs_times, needs_head = SAMPLERS[sampler_name]
    model, sampler = build(), samplers.make(sampler_name)
    if times == needs_times and (has_head or not needs_head):
        check_compatible(model, sampler, "ckpt.pt")
        Pipeline(model, sampler)  # the pipeline runs the same check
        return
    with pytest.raises(ValueError) as err:
        check_compatible(model, sampler, "ckpt.pt")
    message = str(err.value)
    assert "\n" not in message
    assert type(model).__name__ in message and type(sampler).__name__ in message and "ckpt.pt" in message
    if times != needs_times:
        assert f"use sampler={'euler' if times == 'global' else 'euler_pf'}" in message
    else:
        assert "difficulty head" in message
    with pytest.raises(ValueError, match=type(model).__name__):
        Pipeline(model, sampler)


def test_the_message_names_the_class_and_the_sampler():
    with pytest.raises(ValueError) as err:
        check_compatible(REPAGlobalTimeDiT(**TINY, **REPA), samplers.EulerPF(), "runs/sit/last.pt")
    assert str(err.value) == ("EulerPF needs a per-patch-time model; runs/sit/last.pt holds REPAGlobalTimeDiT, "
                              "a global-time model (use sampler=euler, heun or sde)")


def test_the_check_sees_through_torch_compile():
    compiled = torch.compile(GlobalTimeDiT(**TINY))  # not run: only its wrapper is inspected
    with pytest.raises(ValueError, match="holds GlobalTimeDiT"):
        check_compatible(compiled, samplers.LookAhead())


def test_the_pipeline_builds_a_sampler_by_name(tmp_path):
    path = tmp_path / "pf.ckpt"
    save_checkpoint(model_checkpoint(tiny_model(dtype=torch.float32)), path)
    pipe = Pipeline.from_checkpoint(path, "look_ahead", sampler_params={"p": 0.3, "context_t_ratio": 1.2})
    assert type(pipe.sampler).__name__ == "LookAhead" and (pipe.sampler.p, pipe.sampler.context_t_ratio) == (0.3, 1.2)
    with pytest.raises(ValueError, match="unknown sampler 'rk45'"):
        Pipeline.from_checkpoint(path, "rk45")
    with pytest.raises(ValueError, match="are for a sampler given by name"):
        pipeline.make_sampler(samplers.LookAhead(), {"p": 0.3})


#################################################################################
#                         The pipeline's pictures, by hand                      #
#################################################################################


@pytest.mark.parametrize("name,params,cfg", [("euler_pf", {}, 1.0), ("dual_loop", {"n_inner": 2}, 3.0),
                                             ("look_ahead", {"p": 0.3}, 2.0)])
def test_draw_equals_the_sampler_by_hand(name, params, cfg):
    model = tiny_model(dtype=torch.float32)
    noise = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 9, 10, 4])  # 10: the null class
    pipe = Pipeline(model, samplers.make(name, **params), Decoder(3))
    got, info = pipe.draw(5, lambda rows: (noise[rows], labels[rows]), 3, cfg_scale=cfg, batch_size=5)
    by_hand = samplers.make(name, **params)(model, noise, 3, y=labels, cfg_scale=cfg)
    expected = ((by_hand.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # the documented value range
    assert got.dtype == torch.uint8 and got.shape == (5, 3, 8, 8)
    assert torch.equal(got, expected)
    assert info["nfe"] == samplers.make(name, **params).expected_nfe(3)


def test_graphed_sampling_pads_a_short_batch_and_captures_once_per_setting(monkeypatch):
    """The CUDA-graph path on the CPU: a stand-in for GraphedSampler runs the captured
    setting eagerly, on the full (padded) batch it was built for."""
    captured = []

    class EagerGraph:
        def __init__(self, sampler, model, shape, steps, *, cfg_scale, device, guidance_interval):
            captured.append((shape, steps, cfg_scale))
            self.sampler, self.model, self.shape, self.steps, self.cfg_scale = sampler, model, shape, steps, cfg_scale
            self.nfe = self.guided_nfe = 0

        def __call__(self, x, y):
            assert x.shape == self.shape and y.shape == (self.shape[0],)
            out = self.sampler(self.model, x, self.steps, y=y, cfg_scale=self.cfg_scale)
            self.nfe, self.guided_nfe = self.sampler.nfe, self.sampler.guided_nfe
            return out

    monkeypatch.setattr(pipeline, "GraphedSampler", EagerGraph)
    model = tiny_model(dtype=torch.float32)
    pipe = Pipeline(model, samplers.EulerPF(), Decoder(3))
    pipe.graphs = {}  # what use_graphs() sets on a CUDA device
    noise = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 2, 3, 4, 5])
    got, info = pipe.draw(5, lambda rows: (noise[rows], labels[rows]), 2, cfg_scale=2.0, batch_size=3)
    assert captured == [((3, 3, 8, 8), 2, 2.0)]  # one capture serves the full batch and the padded last one
    assert info == {**info, "nfe": 2, "guided_nfe": 2}
    padded = torch.cat([noise, noise[-1:]]), torch.cat([labels, labels[-1:]])
    by_hand = torch.cat([samplers.EulerPF()(model, padded[0][i:i + 3], 2, y=padded[1][i:i + 3], cfg_scale=2.0)
                         for i in (0, 3)])[:5]
    assert torch.equal(got, to_uint8(by_hand))
    pipe.draw(2, lambda rows: (noise[rows], labels[rows]), 3, cfg_scale=2.0, batch_size=3)
    assert len(captured) == 2  # another step count: another capture


def test_generate_is_seeded_noise_and_balanced_labels():
    model = tiny_model(dtype=torch.float32, in_channels=1)
    got, _ = pipeline.generate(model, samplers.EulerPF(), 12, 2, seed=7, batch_size=12, cfg_scale=2.0)
    noise = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    labels = torch.arange(12) % 10
    assert torch.equal(got, to_uint8(samplers.EulerPF()(model, noise, 2, y=labels, cfg_scale=2.0)))


def test_indexed_inputs_depend_on_the_seed_and_index_only():
    noise, labels = pipeline.indexed_inputs([4, 2], (1, 8, 8), 10, 3, None)
    for row, i in enumerate([4, 2]):
        g = torch.Generator().manual_seed(3 * 1_000_003 + i)
        assert torch.equal(noise[row], torch.randn((1, 8, 8), generator=g))
        assert int(labels[row]) == int(torch.randint(10, (1,), generator=g))
    every_noise, every_label = pipeline.indexed_inputs(range(6), (1, 8, 8), 10, 3, None)
    assert torch.equal(noise, every_noise[[4, 2]]) and torch.equal(labels, every_label[[4, 2]])  # any subset, any order
    _, cycled = pipeline.indexed_inputs([0, 1, 2, 3], (1, 8, 8), 10, 3, [5, 6, 7])
    assert cycled.tolist() == [5, 6, 7, 5]


class _Vae(torch.nn.Module):
    """A stand-in autoencoder: (B, 4, h, w) latents -> (B, 3, 2h, 2w) through a fixed transposed conv."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.ConvTranspose2d(4, 3, 2, stride=2)
        torch.nn.init.normal_(self.conv.weight, std=0.5, generator=torch.Generator().manual_seed(2))

    def decode(self, z):
        return type("Decoded", (), {"sample": self.conv(z)})()


def test_a_latent_checkpoint_decodes_with_its_autoencoder(tmp_path, monkeypatch):
    import pf.autoencoder

    vae = _Vae()
    monkeypatch.setattr(pf.autoencoder, "load_vae", lambda path, device="cpu": vae)
    model = tiny_model(dtype=torch.float32, in_channels=4, seed=2)
    path = tmp_path / "latent.ckpt"
    save_checkpoint(model_checkpoint(model), path)
    pipe = Pipeline.from_checkpoint(path, samplers.EulerPF(), vae=tmp_path, vae_scale=0.5)
    got, _ = pipe.generate(3, 2, seed=1, labels=torch.tensor([1, 2, 3]))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latents = samplers.EulerPF()(model, noise, 2, y=torch.tensor([1, 2, 3]))
        expected = to_uint8(vae.conv(latents / 0.5).clamp(-1, 1))
    assert got.shape == (3, 3, 16, 16) and torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"latent model \(in_channels=4\): pass vae=PATH"):
        Pipeline.from_checkpoint(path, samplers.EulerPF())


def _fake_encoder(prompts):
    """Prompts -> a TextCond that depends on the prompt (its length and characters)."""
    rows = []
    for p in prompts:
        g = torch.Generator().manual_seed(sum(map(ord, p)))
        rows.append(torch.randn(3, 12, generator=g) * (len(p) > 0))
    return TextCond(torch.stack(rows), torch.ones(len(prompts), 3, dtype=torch.bool))


_fake_encoder.dim = 12


def test_a_text_checkpoint_draws_prompts_with_its_encoder(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "encoder_from_config", lambda text, device="cpu", path=None: _fake_encoder)
    torch.manual_seed(0)
    model = PatchForcingT2I(**T2I).eval()
    path = tmp_path / "t2i.ckpt"
    save_checkpoint(model_checkpoint(model, train_config={"text": {"name": "minilm"}}), path)
    pipe = Pipeline.from_checkpoint(path, samplers.EulerPF())
    prompts = ["a seven", "the digit 3", "zero"]
    got, _ = pipe.generate(3, 2, seed=4, cfg_scale=2.0, prompts=prompts, batch_size=3)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    by_hand = samplers.EulerPF()(model, noise, 2, y=_fake_encoder(prompts), cfg_scale=2.0, uc_cond=_fake_encoder([""]))
    assert torch.equal(got, to_uint8(by_hand))
    encoded = []
    monkeypatch.setattr(pipe.text, "encoder", lambda ps: encoded.append(list(ps)) or _fake_encoder(ps))
    pipe.generate(3, 1, prompts=prompts, cfg_scale=2.0, batch_size=1)
    assert encoded == [prompts, [""]]  # the prompts and guidance's empty prompt once each, not once a batch
    with pytest.raises(ValueError, match="holds a text-to-image model: draw it with prompts"):
        pipe.generate(3, 2)
    save_checkpoint(model_checkpoint(model), tmp_path / "no_text.ckpt")
    with pytest.raises(ValueError, match="does not say which text encoder"):
        Pipeline.from_checkpoint(tmp_path / "no_text.ckpt", samplers.EulerPF())


#################################################################################
#                           The entry points go through it                      #
#################################################################################


@pytest.fixture
def draws(monkeypatch):
    """Every Pipeline.draw call: (model class, sampler class, count)."""
    calls = []
    original = Pipeline.draw

    def spy(self, count, *args, **kwargs):
        calls.append((type(self.base).__name__, type(self.sampler).__name__, count))
        return original(self, count, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "draw", spy)
    return calls


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    pf_path, sit_path = folder / "pf.ckpt", folder / "repa-sit.ckpt"
    save_checkpoint(model_checkpoint(tiny_model(dtype=torch.float32)), pf_path)
    torch.manual_seed(0)
    save_checkpoint(model_checkpoint(REPAGlobalTimeDiT(**TINY, **REPA)), sit_path)
    return {"pf": pf_path, "sit": sit_path}


def test_pf_sample_draws_through_the_pipeline(ckpts, tmp_path, draws, capsys):
    from pf import sample

    assert sample.main([f"ckpt={ckpts['pf']}", "sampler=euler_pf", "steps=2", "n=3", "classes=[1,2,3]",
                        f"out={tmp_path}", "progress=false"]) == 0
    assert draws == [("PatchForcingDiT", "EulerPF", 3)]
    grid = np.asarray(Image.open(tmp_path / "euler_pf-steps2-cfg4-seed0.png"))
    assert grid.ndim == 3 and grid.shape[-1] == 3
    # the REPA SiT baseline with a per-patch sampler: the pipeline's one line, exit code 2
    assert sample.main([f"ckpt={ckpts['sit']}", "sampler=look_ahead", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: LookAhead needs a per-patch-time model; {ckpts['sit']} holds REPAGlobalTimeDiT, "
                   "a global-time model (use sampler=euler, heun or sde)")


def test_pf_eval_draws_through_the_pipeline(ckpts, draws):
    from omegaconf import OmegaConf

    from pf.eval.__main__ import DEFAULTS, load_images

    cfg = OmegaConf.create(DEFAULTS)
    cfg.num_samples, cfg.batch_size, cfg.sampler.steps, cfg.sampler.name = 4, 3, 2, "euler"
    images, info = load_images(str(ckpts["sit"]), cfg, "generated")
    assert draws == [("REPAGlobalTimeDiT", "Euler", 4)]
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8 and info["nfe"] == 2
    cfg.sampler.name = "euler_pf"  # the check that once missed REPAGlobalTimeDiT
    with pytest.raises(ValueError, match="EulerPF needs a per-patch-time model; .* holds REPAGlobalTimeDiT"):
        load_images(str(ckpts["sit"]), cfg, "generated")


def test_the_t2i_study_loads_through_the_pipeline(ckpts, monkeypatch):
    import pf.experiments.t2i as t2i

    class Loaded(Exception):
        pass

    def from_checkpoint(cls, path, sampler, **kwargs):
        raise Loaded(path, type(sampler).__name__, kwargs)

    monkeypatch.setattr(Pipeline, "from_checkpoint", classmethod(from_checkpoint))
    monkeypatch.setattr(t2i, "trained", lambda study: {"checkpoint": str(ckpts["pf"])})
    study = {"eval": {"sampler": "dual_loop", "per_prompt": 1, "steps": 2, "cfg": 2.0, "batch_size": 4, "seeds": [0]}}
    with pytest.raises(Loaded) as loaded:
        t2i.recognition_stage(study, 0)
    assert loaded.value.args[:2] == (str(ckpts["pf"]), "DualLoop")
