"""Released-format and own checkpoints: strict, safe loading and atomic writes."""

import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from model_helpers import tiny_global_model, tiny_model
from pf.models import load_checkpoint, save_checkpoint
from pf.models.checkpoint import model_checkpoint
from pf.samplers import DualLoop

RELEASED_PARAMS = dict(in_channels=3, input_size=8, depth=2, hidden_size=32, patch_size=2, num_heads=4,
                       num_classes=10, compile=False, predict_uncertainty=True)
TARGET = "patch_flow.models.pf_transformer.PatchForcingDiT"


@pytest.mark.parametrize("as_omegaconf", [False, True])
def test_released_checkpoint_loads_strictly_and_reproduces_outputs(tmp_path, as_omegaconf):
    model = tiny_model(dtype=torch.float32)
    config = {"target": TARGET, "params": RELEASED_PARAMS}
    if as_omegaconf:
        config = OmegaConf.create(config)
    torch.save({"state_dict": model.state_dict(), "config": config}, tmp_path / "pft.ckpt")
    loaded = load_checkpoint(tmp_path / "pft.ckpt")
    assert not loaded.training
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2, 16), torch.tensor([1, 10])
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
    noise = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(
        DualLoop()(loaded.double(), noise, 3, y=torch.tensor([4]), cfg_scale=4.0),
        DualLoop()(model.double(), noise, 3, y=torch.tensor([4]), cfg_scale=4.0),
    )


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = tiny_model(dtype=torch.float32).state_dict()
    sd.pop("final_layer.linear.bias")
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    torch.save({"state_dict": sd, "config": {"target": TARGET, "params": RELEASED_PARAMS}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"missing keys \['final_layer.linear.bias'\].*unexpected keys \['blocks.0.attn.extra'\]"):
        load_checkpoint(tmp_path / "bad.ckpt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a Patch Forcing checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_not_run(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": {}, "config": _Evil()}, f)
    with pytest.raises(ValueError, match=r"not a readable checkpoint \(read without running pickled code\): \S") as err:
        load_checkpoint(tmp_path / "evil.pt")
    _no_unsafe_advice(str(err.value))


def _no_unsafe_advice(message: str) -> None:
    assert "weights_only=False" not in message and "Re-running" not in message and "weights_only` set" not in message
    assert "\n" not in message.strip() and not message.rstrip().endswith(":"), message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unreadable_files_get_a_complete_safe_message(tmp_path):
    # issue 27, finding 10: torch's "Re-running with weights_only=False will likely succeed" was
    # passed on for random bytes and payloads (dangerous for a hostile file); an empty file's
    # message ended at a bare colon
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"config": _Evil()}, tmp_path / "payload.pt")
    for name, reason in (("random.pt", r"not a readable checkpoint \(read without running pickled code\): \S"),
                         ("empty.pt", r"empty.pt is empty \(0 bytes\), not a checkpoint$"),
                         ("payload.pt", r"not a readable checkpoint .*: .*GLOBAL posix\.system")):
        with pytest.raises(ValueError, match=reason) as err:
            load_checkpoint(tmp_path / name)
        _no_unsafe_advice(str(err.value))


def test_own_format_round_trip_prefers_ema(tmp_path):
    model = tiny_global_model(dtype=torch.float32)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_checkpoint(model_checkpoint(model, ema, step=7), tmp_path / "run" / "last.pt")
    loaded = load_checkpoint(tmp_path / "run" / "last.pt")
    assert type(loaded).__name__ == "GlobalTimeDiT"
    torch.testing.assert_close(loaded.final_layer.linear.bias, model.final_layer.linear.bias + 1)
    raw = load_checkpoint(tmp_path / "run" / "last.pt", use_ema=False)
    torch.testing.assert_close(raw.final_layer.linear.bias, model.final_layer.linear.bias)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "state_dict": {}, "config": {}}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
