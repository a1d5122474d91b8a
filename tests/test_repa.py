"""REPA with Patch Forcing (SPEC.md section 9): the projector model against the float64
reference, the published state-dict layout, the alignment loss, the frozen encoders, and
training with the alignment term (falling repa_loss, exact resume, DDP, EMA, export)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

import pf.train as pf_train
import spec_reference as ref
from model_helpers import TINY, tiny_model
from pf import samplers
from pf.encoders import ClassifierEncoder, build_image_encoder, register_image_encoder, resample_tokens
from pf.encoders.classifier import SmallCNN, save_classifier
from pf.models import PatchForcingDiT, REPAPatchForcingDiT, load_checkpoint
from pf.models.checkpoint import read_checkpoint_file
from pf.training.objective import Alignment, FlowBatch, Objective, Prediction
from train_helpers import BASE, make_cfg

ROOT = Path(__file__).resolve().parent.parent
REPA = dict(z_dim=12, encoder_depth=1, projector_dim=16)


def _inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = (TINY["input_size"] // TINY["patch_size"]) ** 2
    x = torch.randn(b, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=g, dtype=torch.float64)
    t = torch.rand(b, n, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 4, 10][:b])  # 10: the null class
    return x, t, y


# --------------------------------------------------------------------------- model
def test_repa_model_matches_the_spec_reference_and_keeps_v_and_logvar():
    model = tiny_model(REPAPatchForcingDiT, **REPA)
    x, t, y = _inputs()
    v, logvar, z = model(x, t, y, return_uncertainty=True, return_repa=True)
    sd = model.state_dict()
    rv, rlv, hidden = ref.model_forward(sd, TINY, x, t, y, tap=REPA["encoder_depth"])
    torch.testing.assert_close(v, rv, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logvar, rlv, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(z, ref.repa_projection(sd, hidden), rtol=1e-9, atol=1e-10)
    assert z.shape == (3, 16, REPA["z_dim"])
    # v and logvar are exactly those of the same weights without the projector; sampling never needs z
    plain = PatchForcingDiT(**TINY).double().eval()
    plain.load_state_dict({k: w for k, w in sd.items() if not k.startswith("projector.")}, strict=True)
    pv, plv = plain(x, t, y, return_uncertainty=True)
    assert torch.equal(pv, v) and torch.equal(plv, logvar) and torch.equal(model(x, t, y), v)
    out = samplers.make("euler_pf")(model.float(), x.float(), 3, y=y, cfg_scale=2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_projector_layout_init_and_bad_depth():
    model = REPAPatchForcingDiT(**TINY, **REPA)
    names = sorted(k for k in model.state_dict() if k.startswith("projector."))
    assert names == [f"projector.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")]
    for i, (fan_in, fan_out) in {0: (32, 16), 2: (16, 16), 4: (16, 12)}.items():
        layer = model.projector[i]
        assert layer.weight.shape == (fan_out, fan_in) and torch.equal(layer.bias, torch.zeros(fan_out))
        bound = (6 / (fan_in + fan_out)) ** 0.5  # xavier-uniform
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.5 * bound
    assert model.config()["encoder_depth"] == 1 and model.config()["z_dim"] == 12
    with pytest.raises(ValueError, match=r"encoder_depth must lie in \[1, depth=2\]"):
        REPAPatchForcingDiT(**TINY, z_dim=12, encoder_depth=3)


def test_a_published_layout_repa_file_loads_strictly_and_samples(tmp_path):
    model = tiny_model(REPAPatchForcingDiT, dtype=torch.float32, **REPA)
    params = {k: TINY[k] for k in ("in_channels", "input_size", "depth", "hidden_size", "patch_size", "num_heads",
                                   "num_classes")}
    released = {"state_dict": model.state_dict(),
                "config": OmegaConf.create({"target": "patch_flow.models.pf_transformer_repa.REPAPatchForcingDiT",
                                            "params": {**params, "compile": False, **REPA}})}
    torch.save(released, tmp_path / "repa.ckpt")
    loaded = load_checkpoint(tmp_path / "repa.ckpt")
    assert type(loaded).__name__ == "REPAPatchForcingDiT" and loaded.encoder_depth == 1
    x, t, y = _inputs()
    x, t = x.float(), t.float()
    rv, rlv = ref.model_forward(model.state_dict(), TINY, x, t, y)
    v, lv = loaded(x, t, y, return_uncertainty=True)
    torch.testing.assert_close(v.double(), rv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lv.double(), rlv, rtol=1e-4, atol=1e-5)
    out = samplers.make("look_ahead")(loaded, x, 3, y=y, cfg_scale=2.0)
    assert torch.isfinite(out).all()
    # a missing projector weight is named
    broken = {**released, "state_dict": {k: w for k, w in released["state_dict"].items() if k != "projector.2.bias"}}
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match=r"missing keys \['projector.2.bias'\]"):
        load_checkpoint(tmp_path / "broken.ckpt")


# ------------------------------------------------------------------ loss and tokens
class _FixedEncoder(nn.Module):
    """A frozen conv 'encoder' with a 2x2 token grid of 12 features."""

    z_dim = 12

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(3, 12, 4, stride=4).double()

    def forward(self, x):
        return self.conv(x.double()).flatten(2).transpose(1, 2)  # (B, 4, 12)


def _stub_factory(weights=None, **_):
    return _FixedEncoder()


def test_alignment_term_is_negative_mean_cosine_to_resampled_encoder_tokens():
    encoder = build_image_encoder("test_repa:_stub_factory")  # an import path
    term = Alignment(encoder, grid=4, weight=0.5)
    x, t, y = _inputs()
    z = torch.randn(3, 16, 12, dtype=torch.float64, requires_grad=True)
    loss = term(FlowBatch(x, y, t, x, pixels=x), None, Prediction(x, None, z))
    h = resample_tokens(_FixedEncoder()(x), 4)  # 2x2 tokens -> the 4x4 DiT grid
    torch.testing.assert_close(loss.double(), ref.repa_loss(z, h), rtol=1e-6, atol=1e-7)
    loss.backward()
    assert z.grad is not None and not any(p.requires_grad for p in encoder.parameters())  # encoder frozen
    with pytest.raises(ValueError, match="z_dim must be the encoder's token width"):
        term(FlowBatch(x, y, t, x, pixels=x), None, Prediction(x, None, z[..., :5]))
    with pytest.raises(ValueError, match="needs the images behind the batch"):
        term(FlowBatch(x, y, t, x), None, Prediction(x, None, z))


def _bilinear_weights(src: int, dst: int) -> torch.Tensor:
    """(dst, src) 1-D bilinear weights, half-pixel centres (align_corners=False), upsampling."""
    w = torch.zeros(dst, src, dtype=torch.float64)
    for o in range(dst):
        u = min(max((o + 0.5) * src / dst - 0.5, 0.0), src - 1)
        lo = int(u)
        hi = min(lo + 1, src - 1)
        w[o, lo] += 1 - (u - lo)
        w[o, hi] += u - lo
    return w


def test_resample_tokens_up_is_bilinear_and_keeps_raster_order():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)  # a 3x3 grid
    out = resample_tokens(h, 5)
    w = _bilinear_weights(3, 5)
    maps = h.reshape(2, 3, 3, 5)
    expected = torch.einsum("ai,bj,nijc->nabc", w, w, maps).reshape(2, 25, 5)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    assert resample_tokens(h, 3) is h
    # shrinking: constant maps stay constant, a left-to-right ramp stays one
    ramp = torch.arange(8, dtype=torch.float64).repeat(8).reshape(1, 64, 1)
    small = resample_tokens(ramp, 4).reshape(4, 4)
    assert (small.diff(dim=1) > 0).all() and torch.allclose(small.diff(dim=0), torch.zeros(3, 4, dtype=torch.float64), atol=1e-9)
    with pytest.raises(ValueError, match="square grid"):
        resample_tokens(torch.zeros(1, 6, 2), 2)


# ------------------------------------------------------------------------ encoders
@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "clf.pt"
    torch.manual_seed(0)
    save_classifier(path, SmallCNN(1, 16, 10, width=4), {"test_accuracy": 0.1}, data="digits")
    return path


def test_classifier_encoder_tokens_preprocessing_and_freezing(classifier_file):
    enc = build_image_encoder("classifier", weights=str(classifier_file))
    assert isinstance(enc, ClassifierEncoder) and enc.z_dim == 8
    rgb = torch.rand(2, 3, 8, 8) * 2 - 1  # 3 channels at 8x8: grey and 16x16 inside
    tokens = enc(rgb)
    assert tokens.shape == (2, 64, 8) and not tokens.requires_grad
    grey = torch.nn.functional.interpolate(rgb.mean(1, keepdim=True), size=(16, 16), mode="bilinear",
                                           align_corners=False, antialias=True)
    # independent of how the tokens are cut out: laid back on the 8x8 grid in raster order and
    # pooled to 2x2 as the classifier pools them, they give its own penultimate features (a
    # transposed or shuffled grid would not)
    maps = tokens.transpose(1, 2).reshape(2, 8, 8, 8)  # (B, C, 8, 8)
    pooled = torch.nn.functional.adaptive_avg_pool2d(maps, 2).flatten(1)
    with torch.no_grad():
        torch.testing.assert_close(torch.relu(enc.net.fc(pooled)), enc.net.features(grey))
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(FileNotFoundError, match=r"set trainer.repa.weights=<file>"):
        build_image_encoder("classifier", weights="/nope/clf.pt")
    with pytest.raises(ValueError, match=r"unknown image encoder 'dinov3'"):
        build_image_encoder("dinov3")


def test_dinov2_loads_through_a_local_torch_hub_repo(tmp_path):
    repo = tmp_path / "dinov2"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        "import torch\n"
        "class Tiny(torch.nn.Module):\n"
        "    embed_dim = 6\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.patch = torch.nn.Conv2d(3, 6, 14, stride=14)\n"
        "    def forward_features(self, x):\n"
        "        t = self.patch(x).flatten(2).transpose(1, 2)\n"
        "        return {'x_norm_patchtokens': t, 'x_norm_clstoken': t.mean(1)}\n"
        "def dinov2_vitb14(pretrained=True):\n"
        "    assert not pretrained, 'nothing is downloaded'\n"
        "    return Tiny()\n")
    sys.path.insert(0, str(repo))
    try:
        import hubconf

        net = hubconf.Tiny()
    finally:
        sys.path.remove(str(repo))
        sys.modules.pop("hubconf", None)
    torch.save(net.state_dict(), tmp_path / "dinov2_vitb14.pth")
    enc = build_image_encoder("dinov2", weights=str(tmp_path / "dinov2_vitb14.pth"), repo=str(repo), resolution=28)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    big = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(28, 28), mode="bicubic",
                                          align_corners=False, antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = net.forward_features(((big + 1) / 2 - mean) / std)["x_norm_patchtokens"]
    torch.testing.assert_close(enc(x), expected)
    assert enc.z_dim == 6
    with pytest.raises(FileNotFoundError, match="trainer.repa.repo"):
        build_image_encoder("dinov2", weights=str(tmp_path / "dinov2_vitb14.pth"), repo=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"dinov2 encoder weights not found: .*trainer.repa.weights"):
        build_image_encoder("dinov2", weights=str(tmp_path / "none.pth"), repo=str(repo))


def test_timm_model_from_a_local_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10)
    torch.save(net.state_dict(), tmp_path / "vit.pth")  # with its classifier head, as released
    enc = build_image_encoder("timm", weights=str(tmp_path / "vit.pth"), model="vit_tiny_patch16_224", resolution=32)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert enc.z_dim == 192 and enc.prefix == 1
    # the reference: timm's own model at 32x32 from the same file, normalised with its config
    ref_net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0).eval()
    ref_net.load_state_dict(torch.load(tmp_path / "vit.pth"), strict=False)
    cfg = ref_net.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    big = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        expected = ref_net.forward_features(((big + 1) / 2 - mean) / std)[:, 1:]
    torch.testing.assert_close(enc(x), expected)
    assert enc(x).shape == (2, 4, 192)
    with pytest.raises(ValueError, match="trainer.repa.model"):
        build_image_encoder("timm", weights=str(tmp_path / "vit.pth"))


def test_registered_encoder(classifier_file):
    register_image_encoder("stub-for-test", _stub_factory)
    enc = build_image_encoder("stub-for-test")
    assert enc.z_dim == 12 and enc(torch.zeros(1, 3, 8, 8)).shape == (1, 4, 12)
    with pytest.raises(ValueError, match="cannot import"):
        build_image_encoder("no_such_module:make")


# ------------------------------------------------------------------------ training
REPA_TRAIN = [*BASE, "trainer.repa.enabled=true", "trainer.repa.projector_dim=32"]


def _cfg(classifier_file, *overrides):
    return make_cfg(f"trainer.repa.weights={classifier_file}", *overrides, base=REPA_TRAIN)


pytestmark = pytest.mark.usefixtures("one_thread")


def _records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_training_with_repa_logs_a_falling_repa_loss_and_writes_a_repa_model(tmp_path, classifier_file):
    cfg = _cfg(classifier_file, "trainer.max_steps=30", "trainer.log_every=10", "trainer.val_every=30",
               "trainer.sample_every=30", "trainer.lr=3e-3")
    out = pf_train.train(cfg, tmp_path)
    recs = [r for r in _records(tmp_path) if "repa_loss" in r]
    assert [r["step"] for r in recs] == [10, 20, 30]
    assert recs[-1]["repa_loss"] < recs[0]["repa_loss"] - 0.05 and all(-1 <= r["repa_loss"] <= 1 for r in recs)
    # loss = mse + 0.01 nll + 0.5 repa_loss, each logged
    for r in recs:
        assert r["loss"] == pytest.approx(r["mse"] + 0.01 * r["nll"] + 0.5 * r["repa_loss"], rel=1e-5, abs=1e-6)
    model = out["model"]
    assert type(model).__name__ == "REPAPatchForcingDiT" and model.z_dim == 8 and model.encoder_depth == 2
    ema = read_checkpoint_file(tmp_path / "checkpoints" / "last.pt")["ema"]
    assert "projector.4.weight" in ema  # the EMA follows the projector too
    loaded = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert type(loaded).__name__ == "REPAPatchForcingDiT" and (tmp_path / "samples" / "step_000030.png").is_file()
    # export to the published REPA layout, loaded back strictly
    from pf.export import export

    path = export(tmp_path / "checkpoints" / "last.pt", tmp_path / "repa-released.ckpt")
    released = read_checkpoint_file(path)
    assert released["config"]["target"] == "patch_flow.models.pf_transformer_repa.REPAPatchForcingDiT"
    assert {k: released["config"]["params"][k] for k in REPA} == {"z_dim": 8, "encoder_depth": 2, "projector_dim": 32}
    again = load_checkpoint(path)
    x = torch.randn(2, 1, 16, 16)
    t = torch.rand(2, 64)
    y = torch.tensor([0, 3])
    assert torch.equal(again(x, t, y), loaded(x, t, y))


def test_repa_resume_is_exact(tmp_path, classifier_file):
    common = ["trainer.ckpt_every=2", "trainer.val_every=100", "trainer.sample_every=100"]
    full = pf_train.train(_cfg(classifier_file, "trainer.max_steps=4", *common), tmp_path / "full")
    pf_train.train(_cfg(classifier_file, "trainer.max_steps=2", *common), tmp_path / "part")
    resumed = pf_train.train(_cfg(classifier_file, "trainer.max_steps=4", *common,
                                  f"resume={tmp_path / 'part'}"), tmp_path / "part")
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["repa_loss"] for r in _records(tmp_path / "full")] == [r["repa_loss"] for r in _records(tmp_path / "part")]


def test_repa_needs_pixels_and_a_fitting_depth(tmp_path, classifier_file):
    with pytest.raises(ValueError, match=r"trainer.repa.encoder_depth: encoder_depth must lie in \[1, depth=4\]"):
        pf_train.train(_cfg(classifier_file, "trainer.max_steps=1", "trainer.repa.encoder_depth=5"), tmp_path)
    with pytest.raises(ValueError, match="a single file of latents carries no pixels, which trainer.repa needs"):
        pf_train.train(_cfg(classifier_file, "trainer.max_steps=1", "data=latents", f"data.path={tmp_path}"),
                       tmp_path / "lat")


def test_two_rank_ddp_with_repa_keeps_ranks_identical(tmp_path, classifier_file):
    import torch.multiprocessing as mp

    from test_train import _ddp_worker, _free_port

    cfg = _cfg(classifier_file, "trainer.max_steps=2", "trainer.val_every=100", "trainer.sample_every=100")
    mp.spawn(_ddp_worker, args=(2, _free_port(), OmegaConf.to_yaml(cfg), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0) and "projector.0.weight" in r0


def test_objective_asks_the_model_only_for_the_heads_its_terms_read():
    from pf.training.objective import DifficultyNLL, FlowMSE

    model = tiny_model(REPAPatchForcingDiT, **REPA)
    calls = []

    def spy(*args, **kwargs):
        calls.append(sorted(kwargs))
        return model(*args, **kwargs)

    spy.patch_size = model.patch_size
    x, t, y = _inputs()
    Objective([FlowMSE()])(spy, FlowBatch(x, y, t, torch.zeros_like(x)))
    Objective([FlowMSE(), DifficultyNLL()])(spy, FlowBatch(x, y, t, torch.zeros_like(x)))
    assert calls == [[], ["return_uncertainty"]]
    with pytest.raises(ValueError, match="distinct names"):
        Objective([FlowMSE(), FlowMSE()])
