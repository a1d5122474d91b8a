"""python -m pf.export: EMA weights in the released format or as safetensors."""

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
