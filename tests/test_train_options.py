"""The trainer's options for runs at scale (issue 28): learning-rate schedules, gradient
accumulation, fp16 loss scaling, activation checkpointing; each against an independent
expectation (closed forms, the big batch's gradient, the plain backward) and resumed exactly.

PF-Tiny/2 on the embedded digits, a few steps; the gradient checks use float64 parameters.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import pf.train as pf_train
from train_helpers import make_cfg
from pf.models.checkpoint import read_checkpoint_file
from pf.models.presets import build_model
from pf.training.lr_schedule import build_scheduler
from pf.training.memory import checkpoint_blocks
from pf.training.objective import FlowBatch, flow_objective
from pf.training.precision import Precision
from pf.training.step import TrainStep

pytestmark = pytest.mark.usefixtures("one_thread")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


# ------------------------------------------------------------------- schedules
def _lrs(schedule: str, steps: int = 10, **keys) -> list[float]:
    tc = OmegaConf.create({"lr_schedule": schedule, "lr": 2.0, "min_lr": 0.2, "warmup_steps": 2, "max_steps": steps,
                           "decay_fraction": 0.2, **keys})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr)
    sched, lrs = build_scheduler(opt, tc), []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])  # the lr optimizer step s uses
        opt.step()
        sched.step()
    return lrs


def test_lr_schedules_follow_their_closed_forms():
    # warm-up 2 steps: lr * (s + 1) / 2, then (lr 2, min_lr 0.2, 10 steps)
    assert _lrs("constant") == pytest.approx([1.0] + [2.0] * 9)
    cosine = [1.0, 2.0] + [0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert _lrs("cosine") == pytest.approx(cosine)
    assert _lrs("cosine")[6] == pytest.approx(1.1)  # half-way through the decay: (2 + 0.2) / 2
    # wsd: decay over the last round(0.2 * 10) = 2 steps, linearly, ending at min_lr on the last step
    assert _lrs("wsd") == pytest.approx([1.0] + [2.0] * 7 + [1.1, 0.2])
    assert _lrs("wsd", decay_fraction=0.5) == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0, 1.64, 1.28, 0.92, 0.56, 0.2])


# -------------------------------------------------------- accumulation, checkpointing
def _tiny64(dropout: float = 0.1):
    torch.manual_seed(0)
    model = build_model("Tiny/2", per_token=True, input_size=16, in_channels=1, num_classes=10,
                        class_dropout_prob=dropout, predict_uncertainty=True).double()
    with torch.no_grad():  # AdaLN-Zero starts with zero gates: give every path a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _batch(b: int = 8) -> FlowBatch:
    g = torch.Generator().manual_seed(1)
    x1 = torch.rand(b, 1, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    return FlowBatch(x1, torch.randint(0, 10, (b,), generator=g), torch.rand(b, 64, generator=g, dtype=torch.float64),
                     torch.randn(x1.shape, generator=g, dtype=torch.float64))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class _CountingSync:
    """Stands in for DDP's no_sync: counts the backward passes run inside it."""

    def __init__(self):
        self.entered = 0

    @contextlib.contextmanager
    def __call__(self):
        self.entered += 1
        yield


def test_accumulated_step_equals_the_big_batch_step():
    big, acc = _tiny64(), _tiny64()
    objective = flow_objective(big, 0.01)
    # the independent expectation: one plain backward of the 8-row batch
    torch.manual_seed(5)  # class dropout draws from the global generator
    objective(big, _batch())["loss"].backward()
    expected = _grads(big)

    sync = _CountingSync()
    opt = torch.optim.AdamW(acc.parameters(), lr=1e-3)
    step = TrainStep(acc, objective, acc.parameters(), opt, Precision("fp32", torch.device("cpu")), grad_accum=4,
                     grad_clip=1e9, skip_sync=sync)
    torch.manual_seed(5)
    out = step.accumulate(_batch())
    assert sync.entered == 3  # no gradient sync on the first three micro-batches, sync on the last
    got = _grads(acc)
    assert got.keys() == expected.keys() and len(got) > 50
    for name in expected:  # float64 parameters; the loss terms are computed in float32 (objective.py)
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-9, msg=name)
    torch.manual_seed(5)
    assert out["loss"].item() == pytest.approx(objective(big, _batch())["loss"].item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"trainer.batch_size=8 does not split into trainer.grad_accum=3"):
        TrainStep(acc, objective, acc.parameters(), opt, Precision("fp32", torch.device("cpu")), 3, 1.0).accumulate(
            _batch())


def test_activation_checkpointing_gives_the_same_gradients_and_recomputes():
    plain, ckpt = _tiny64(), _tiny64()
    assert checkpoint_blocks(ckpt) == len(ckpt.blocks)
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # names unchanged: checkpoints interchangeable
    calls = []
    ckpt.blocks[0].attn.register_forward_pre_hook(lambda *_: calls.append(1))
    objective = flow_objective(plain, 0.01)
    for model in (plain, ckpt):
        torch.manual_seed(5)
        objective(model, _batch())["loss"].backward()
    assert len(calls) == 2  # the forward, and its replay in the backward
    expected, got = _grads(plain), _grads(ckpt)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------ fp16
def test_fp16_overflow_skips_the_step_and_keeps_the_weights_finite(tmp_path, monkeypatch):
    from pf.training.objective import Objective

    real_loss, calls, updates = Objective.__call__, [], []

    def overflowing(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # step 2: finite loss, but its scaled gradients overflow
            out["loss"] = out["loss"] * 1e34
        return out

    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(Objective, "__call__", overflowing)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: updates.append(1) or real_step(self, *a, **k))
    out = pf_train.train(make_cfg("trainer.precision=fp16", "trainer.max_steps=3", "trainer.ckpt_every=3"), tmp_path)
    recs = records(tmp_path)
    assert [r["skipped_steps"] for r in recs] == [0, 1, 1]
    assert [r["loss_scale"] for r in recs] == [65536.0, 32768.0, 32768.0]  # halved by the overflow
    assert recs[1]["grad_norm"] is None  # logged as not finite
    assert len(updates) == 2  # the overflowing step never reached the optimizer
    assert all(torch.isfinite(p).all() for p in out["model"].parameters())
    ckpt = read_checkpoint_file(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["precision"]["skipped"] == 1 and ckpt["precision"]["scaler"]["scale"] == 32768.0


# --------------------------------------------------------------- exact resume
class _Killed(Exception):
    pass


def _train_until(cfg, run_dir: Path, stop: int, monkeypatch) -> None:
    """Train as ``cfg`` says, killed right after the checkpoint of step ``stop`` is written (the
    schedule still spans max_steps, as in a run cut short)."""
    real = pf_train.write_checkpoint

    def write_then_die(ckpt, ckpt_dir, step, keep):
        path = real(ckpt, ckpt_dir, step, keep)
        if step == stop:
            raise _Killed
        return path

    with monkeypatch.context() as m:
        m.setattr(pf_train, "write_checkpoint", write_then_die)
        with pytest.raises(_Killed):
            pf_train.train(cfg, run_dir)


def test_options_resume_exactly(tmp_path, monkeypatch):
    """cosine + grad_accum + fp16 + checkpointing: 4 steps at once equal 2 steps, a kill and a resume."""
    opts = ["trainer.lr_schedule=cosine", "trainer.min_lr=1e-4", "trainer.warmup_steps=1", "trainer.grad_accum=2",
            "trainer.precision=fp16", "trainer.activation_checkpointing=true", "trainer.ckpt_every=2",
            "trainer.max_steps=4"]
    full = pf_train.train(make_cfg(*opts), tmp_path / "full")
    first = tmp_path / "first"
    _train_until(make_cfg(*opts), first, 2, monkeypatch)
    resumed = pf_train.train(make_cfg(*opts, f"resume={first}"), first)
    want = [(r["step"], r["loss"], r["lr"], r["loss_scale"]) for r in records(tmp_path / "full")]
    assert [(r["step"], r["loss"], r["lr"], r["loss_scale"]) for r in records(first)] == want
    assert want[-1][2] < want[1][2]  # the cosine decays
    for a, b in zip(full["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full["ema"].state_dict().values(), resumed["ema"].state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ init_from
def _source(num_classes: int = 10, hidden: int | None = None):
    """A PF-Tiny/2-shaped model with weights of its own (not any run's initialisation)."""
    from pf.models.dit import PatchForcingDiT

    torch.manual_seed(3)
    base = build_model("Tiny/2", per_token=True, input_size=16, in_channels=1, num_classes=num_classes,
                       class_dropout_prob=0.1, predict_uncertainty=True)
    if hidden is not None:
        base = PatchForcingDiT(**{**base.config(), "hidden_size": hidden})
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base


def test_init_only_run_samples_like_its_source(tmp_path):
    import numpy as np

    from pf import sample
    from pf.export import released_checkpoint
    from pf.models.checkpoint import save_checkpoint

    src = tmp_path / "pft-tiny.ckpt"  # the released file format
    save_checkpoint(released_checkpoint(_source()), src)
    pf_train.train(make_cfg(f"init_from={src}", "trainer.max_steps=0"), tmp_path / "run")
    run_ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert read_checkpoint_file(run_ckpt)["step"] == 0
    pictures = []
    for ckpt in (src, run_ckpt):
        args = sample.parse_args([f"ckpt={ckpt}", "steps=3", "n=4", "seed=1", "classes=[1,2,3,4]", "progress=false"])
        pictures.append(sample.draw(sample.build_pipeline(args, torch.device("cpu")), args, list(range(4))))
    assert pictures[0].std() > 0 and np.array_equal(pictures[0], pictures[1])


def test_init_from_names_what_it_could_not_load(tmp_path, caplog):
    from pf.models.checkpoint import model_checkpoint, save_checkpoint

    five = _source(num_classes=5)
    state = {**five.state_dict(), "extra_head.weight": torch.zeros(3)}
    ckpt = model_checkpoint(five, {k: v + 1 for k, v in five.state_dict().items()})  # a run's: raw and EMA
    ckpt["state_dict"] = state
    save_checkpoint(ckpt, tmp_path / "five.pt")
    with caplog.at_level("WARNING", logger="pf.train"):
        out = pf_train.train(make_cfg(f"init_from={tmp_path / 'five.pt'}", "init_from_ema=false",
                                      "trainer.max_steps=0"), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("label table y_embedder.embedding_table.weight is re-initialised (source 6 rows, this model 11" in m
               for m in lines), lines
    assert any("extra_head.weight" in m for m in lines), lines
    model = out["model"]
    assert torch.equal(model.blocks[1].mlp.fc1.weight, five.blocks[1].mlp.fc1.weight)  # raw, not the EMA (+1)
    assert model.y_embedder.embedding_table.weight.shape[0] == 11
    wide = tmp_path / "wide.pt"
    save_checkpoint(model_checkpoint(_source(hidden=96)), wide)
    with pytest.raises(ValueError, match=r"init_from=.*wide.pt: tensor shapes differ .*pos_embed \(1, 64, 96\) vs "
                                         r"\(1, 64, "):
        pf_train.train(make_cfg(f"init_from={wide}", "trainer.max_steps=0"), tmp_path / "run2")


# -------------------------------------------------------------------- logging
def test_tensorboard_events_read_back_with_tensorboards_reader(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    pf_train.train(make_cfg("trainer.log=tensorboard", "trainer.max_steps=2", "trainer.sample_every=2",
                            "trainer.val_every=2", "trainer.ckpt_every=100"), tmp_path)
    recs = records(tmp_path)
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in recs], rel=1e-6)  # float32 events
    assert acc.Scalars("train/val_loss")[0].value == pytest.approx(recs[-1]["val_loss"], rel=1e-6)
    assert recs[-1]["tokens_per_s"] == pytest.approx(recs[-1]["img_per_s"] * 64)  # 16x16 digits, patch 2
    for tag in ("samples", "difficulty"):
        (image,) = acc.Images(tag)
        assert image.step == 2 and image.width >= 64 and image.encoded_image_string[:4] == b"\x89PNG"


def test_wandb_logs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    pf_train.train(make_cfg("trainer.log=[jsonl,wandb]", "trainer.max_steps=1", "trainer.ckpt_every=100"), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (tmp_path / "wandb-id.txt").read_text() in runs[0].name


@pytest.mark.parametrize("overrides, message", [
    (['trainer.log="jsonl,tensorbord"'], r"trainer.log='jsonl,tensorbord': unknown target 'tensorbord'"),
    (["trainer.log=3"], r"trainer.log=3: expected target names"),
    (["trainer.grad_accum=3"], r"trainer.batch_size=8 does not split into trainer.grad_accum=3 equal micro-batches"),
    (["trainer.min_lr=0.1"], r"trainer.min_lr=0.1 is above trainer.lr=0.001"),
    (["trainer.strategy=fsdp", "trainer.precision=fp16"], r"fsdp with trainer.precision=fp16: .*use precision=bf16"),
    (["trainer.lr_schedule=linear"], r"trainer.lr_schedule='linear': expected one of constant, cosine, wsd"),
])
def test_bad_option_values_are_one_line_before_anything_is_written(tmp_path, overrides, message):
    from pf.training.schema import ConfigError

    with pytest.raises(ConfigError, match=message):
        pf_train.train(make_cfg(*overrides, "trainer.max_steps=1"), tmp_path)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- data=custom
FACTORY = '''
import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    def __init__(self, n=64, size=16, scale=1.0, keys=("image", "label"), num_classes=3):
        g = torch.Generator().manual_seed(0)
        self.images = (torch.rand(n, 1, size, size, generator=g) * 2 - 1) * scale
        self.labels = torch.arange(n) % 3
        self.keys, self.num_classes = keys, num_classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return dict(zip(self.keys, (self.images[i], int(self.labels[i]))))


def make(**kwargs):
    return Blobs(**kwargs)
'''


def test_custom_data_trains_from_a_factory(tmp_path, monkeypatch):
    (tmp_path / "my_blobs.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = pf_train.train(make_cfg("data=custom", "data.target=my_blobs:make", "+data.params.n=48",
                                  "trainer.max_steps=2", "trainer.ckpt_every=2"), tmp_path / "run")
    assert out["model"].num_classes == 3 and out["model"].in_channels == 1  # sizes from the first item
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2]


@pytest.mark.parametrize("target, params, message", [
    ("my_blobs", {}, r"data.target='my_blobs': expected 'package.module:factory'"),
    ("no_such_module_xyz:make", {}, r"cannot import no_such_module_xyz"),
    ("my_blobs:missing", {}, r"my_blobs has no callable 'missing'"),
    ("my_blobs:make", {"scale": 127.5}, r"images must lie in \[-1, 1\], the first holds values in .*x / 127.5 - 1"),
    ("my_blobs:make", {"keys": ("img", "label")}, r"items must be dicts with 'image' and 'label', the first is "
                                                  r"\['img', 'label'\]"),
    ("my_blobs:make", {"num_classes": 0}, r"'label' must be an int class id in \[0, -1\], the first is 0"),
    ("my_blobs:make", {"n": 0}, r"the dataset is empty"),
    ("my_blobs:make", {"size": 0}, r"'image' must be a non-empty square \(C, H, W\) tensor, the first is \(1, 0, 0\)"),
    ("my_blobs:make", {"bogus": 1}, r"the factory raised TypeError"),
])
def test_custom_data_errors_name_what_is_wrong(tmp_path, monkeypatch, target, params, message):
    from pf.data import CustomData, DataError

    (tmp_path / "my_blobs.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DataError, match=message) as err:
        CustomData(target, params)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ in-loop FID
def test_in_loop_fid_is_logged_and_sees_the_difference(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    from pf.autoencoder import to_uint8
    from pf.encoders.classifier import SmallCNN, save_classifier
    from pf.training import fid as fid_module

    clf = tmp_path / "clf.pt"
    torch.manual_seed(0)
    save_classifier(clf, SmallCNN(1, 16, 10, width=4), {"test_accuracy": 0.1}, data="digits")
    probes = []
    real_init = fid_module.InLoopFID.__init__
    monkeypatch.setattr(fid_module.InLoopFID, "__init__",
                        lambda self, *a, **k: probes.append(self) or real_init(self, *a, **k))
    pf_train.train(make_cfg("trainer.fid_every=2", "trainer.fid_samples=20", "trainer.fid_reference=200",
                            f"trainer.fid_weights={clf}", "trainer.max_steps=3", "trainer.ckpt_every=100"), tmp_path / "run")
    recs = records(tmp_path / "run")
    assert [r["step"] for r in recs if "fid" in r] == [2, 3]  # every 2 steps and the last
    assert all(r["fid"] > 0 and math.isfinite(r["kid"]) for r in recs if "fid" in r)
    probe = probes[0]
    ref = probe.reference  # uint8 training images
    assert ref.shape == (200, 1, 16, 16) and ref.dtype == torch.uint8
    same = probe.score(ref[:100])  # half of the reference against the whole: near 0
    noise = probe.score(to_uint8(torch.rand(100, 1, 16, 16) * 2 - 1))
    assert same["fid"] < 0.2 * noise["fid"] and same["kid"] < noise["kid"]


def test_model_flops_formula_matches_torchs_flop_counter(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from pf.training import throughput

    model = build_model("S/2", per_token=True, input_size=16, in_channels=4, num_classes=10)
    x1 = torch.randn(2, 4, 16, 16)
    with FlopCounterMode(display=False) as counter:  # the independent count: every matmul and attention op
        flow_objective(model)(model, FlowBatch(x1, torch.tensor([1, 2]), torch.rand(2, 64), torch.randn_like(x1)))[
            "loss"].backward()
    # the formula counts the frozen position table and the label lookup as matmuls: a few % over
    assert counter.get_total_flops() / 2 == pytest.approx(throughput.train_flops_per_image(model), rel=0.05)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert throughput.peak_flops(torch.device("cuda", 0), "bf16") == 989e12
    assert throughput.peak_flops(torch.device("cuda", 0), "fp32") == 989e12 / 2
    assert throughput.peak_flops(torch.device("cpu"), "bf16") is None
