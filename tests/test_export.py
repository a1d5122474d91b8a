"""python -m pf.export: EMA weights in the released format or as safetensors."""

import contextlib
import os

import pytest
import torch

from model_helpers import tiny_global_model, tiny_model
from pf import export
from pf.models import load_checkpoint, save_checkpoint
from pf.models.checkpoint import model_checkpoint


@pytest.mark.parametrize("fmt,suffix", [("released", ".ckpt"), ("safetensors", ".safetensors")])
@pytest.mark.parametrize("make", [tiny_model, tiny_global_model])
def test_export_writes_ema_weights_loadable_strictly(tmp_path, fmt, suffix, make):
    model = make(dtype=torch.float32)
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_checkpoint(model_checkpoint(model, ema, step=3, optimizer={}), tmp_path / "last.pt")
    assert export.main([str(tmp_path / "last.pt"), "--format", fmt]) == 0
    out = tmp_path / f"last_ema{suffix}"
    loaded = load_checkpoint(out)
    assert type(loaded) is type(model)
    for k, v in ema.items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("fmt,suffix", [("released", ".ckpt"), ("safetensors", ".safetensors")])
def test_a_text_to_image_model_exports(tmp_path, fmt, suffix):
    from pf.models import PF_T2I_models

    model = PF_T2I_models["PFT2I-Tiny"](in_channels=1, input_size=8, text_dim=12, depth=1)
    save_checkpoint(model_checkpoint(model), tmp_path / "last.pt")
    assert export.main([str(tmp_path / "last.pt"), "--format", fmt]) == 0
    loaded = load_checkpoint(tmp_path / f"last_ema{suffix}")
    assert type(loaded) is type(model) and loaded.config() == model.config()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_released_export_has_spec_layout(tmp_path):
    model = tiny_model(dtype=torch.float32)
    save_checkpoint(model_checkpoint(model), tmp_path / "last.pt")
    out = export.export(tmp_path / "last.pt", tmp_path / "pft.ckpt", "released", use_ema=False)
    raw = torch.load(out, weights_only=True)
    assert set(raw) == {"state_dict", "config"}
    assert raw["config"]["target"] == "patch_flow.models.pf_transformer.PatchForcingDiT"
    assert set(raw["config"]["params"]) == {"in_channels", "input_size", "depth", "hidden_size", "patch_size",
                                            "num_heads", "num_classes", "compile", "predict_uncertainty"}
    assert set(raw["state_dict"]) == set(model.state_dict())


def test_export_errors(tmp_path, capsys):
    assert export.main([str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "x.safetensors")


def test_export_never_replaces_its_input_and_asks_before_replacing_a_file(tmp_path, capsys):
    """Issue 27, finding 5: ``pf.export ckpt --out ckpt`` replaced the training checkpoint (optimizer,
    EMA, RNG state) with the EMA-only export. The input is never replaced; another existing file
    only with --overwrite; a folder as --out is refused; each in one line (exit 2)."""
    model = tiny_model(dtype=torch.float32)
    ckpt = tmp_path / "run" / "last.pt"
    save_checkpoint(model_checkpoint(model, step=3, optimizer={"state": {}}), ckpt)
    original = ckpt.read_bytes()
    (tmp_path / "link.pt").hardlink_to(ckpt)  # a step file is a hard link to last.pt
    for out in (ckpt, tmp_path / "run" / ".." / "run" / "last.pt", tmp_path / "link.pt"):
        for extra in ([], ["--overwrite"], ["--format", "safetensors", "--overwrite"]):
            assert export.main([str(ckpt), "--out", str(out), *extra]) == 2
            assert "is the checkpoint being exported: name another file" in capsys.readouterr().err
    assert ckpt.read_bytes() == original
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"someone's file")
    assert export.main([str(ckpt), "--out", str(other)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {other} exists: name another file, or add --overwrite "
                                               f"to replace it")
    assert other.read_bytes() == b"someone's file"
    assert export.main([str(ckpt), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err
    assert export.main([str(ckpt), "--out", str(other), "--overwrite"]) == 0
    assert type(load_checkpoint(other)) is type(model)
    assert export.main([str(ckpt)]) == 0 and export.main([str(ckpt)]) == 2  # the default name, a second time
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last.pt", "last_ema.ckpt"]  # no temp files


@pytest.mark.parametrize("fmt", ["released", "safetensors"])
def test_export_is_atomic(tmp_path, monkeypatch, fmt):
    """Issue 27, finding 5: a write that fails half-way leaves the old output whole and no temp file."""
    from pf.models import checkpoint

    model = tiny_model(dtype=torch.float32)
    save_checkpoint(model_checkpoint(model), tmp_path / "last.pt")
    out = tmp_path / "model.out"
    out.write_bytes(b"the previous export")

    def torn(obj, f, *args, **kwargs):
        path = f if isinstance(f, (str, os.PathLike)) else None
        with open(path, "wb") if path else contextlib.nullcontext(f) as handle:
            handle.write(b"half of a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn)
    monkeypatch.setattr(checkpoint, "save_file", lambda state, path, metadata=None: torn(None, path))
    with pytest.raises(OSError, match="No space left"):
        export.export(tmp_path / "last.pt", out, fmt, overwrite=True)
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "model.out"]
