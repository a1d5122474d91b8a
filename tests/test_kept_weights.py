"""The study's kept weights: stored compactly (float16), loaded as the float32 model they were
rounded from to within float16's precision, and naming the exact weights' fingerprint."""

from __future__ import annotations

import torch

from model_helpers import tiny_model
from pf.experiments.common import (KEPT_DTYPE, compact_kept_file, keep_weights, kept_weights_path,
                                   state_fingerprint, weights_fingerprint)
from pf.models import load_checkpoint
from pf.models.checkpoint import model_checkpoint, read_checkpoint_file, save_checkpoint


def _training_checkpoint(tmp_path):
    model = tiny_model(dtype=torch.float32)
    ema = tiny_model(dtype=torch.float32, seed=1)
    path = tmp_path / "last.pt"
    save_checkpoint(model_checkpoint(model, ema_state=ema.state_dict(), step=7), path)
    return path, ema


def test_kept_weights_are_float16_and_name_the_exact_weights(tmp_path):
    checkpoint, ema = _training_checkpoint(tmp_path)
    study = {"records_dir": str(tmp_path / "records")}
    identity = {"trajectory": "abc", "steps": 7}
    path = keep_weights(study, identity, str(checkpoint))
    assert path == kept_weights_path(study, identity)
    kept = read_checkpoint_file(path)
    assert "state_dict" not in kept and kept["step"] == 7
    assert {v.dtype for v in kept["ema"].values() if v.is_floating_point()} == {KEPT_DTYPE}
    assert kept["exact_weights"] == weights_fingerprint(ema)
    loaded = load_checkpoint(path, use_ema=True)
    for (name, want), got in zip(ema.state_dict().items(), loaded.state_dict().values()):
        assert got.dtype == want.dtype, name
        # float16 keeps 11 significant bits: relative error at most 2**-11 (normal range)
        assert torch.allclose(got, want, rtol=2.0**-11, atol=1e-7), name
    # another realization: its own fingerprint, which is what points measured on it record
    assert weights_fingerprint(loaded) != kept["exact_weights"]
    assert weights_fingerprint(loaded) == state_fingerprint({k: v.float() for k, v in kept["ema"].items()})


def test_the_first_realization_stays(tmp_path):
    checkpoint, ema = _training_checkpoint(tmp_path)
    study = {"records_dir": str(tmp_path / "records")}
    identity = {"trajectory": "abc", "steps": 7}
    path = keep_weights(study, identity, str(checkpoint))
    before = path.read_bytes()
    other = tiny_model(dtype=torch.float32, seed=2)
    save_checkpoint(model_checkpoint(other, ema_state=other.state_dict(), step=7), checkpoint)
    keep_weights(study, identity, str(checkpoint))
    assert path.read_bytes() == before


def test_compacting_an_old_float32_file_records_its_fingerprint_once(tmp_path):
    checkpoint, ema = _training_checkpoint(tmp_path)
    old = tmp_path / "old.pt"  # the layout kept before: float32 EMA, no fingerprint
    ckpt = read_checkpoint_file(checkpoint)
    save_checkpoint({k: ckpt[k] for k in ("format", "model_class", "config", "step", "ema")}, old)
    size = old.stat().st_size
    assert compact_kept_file(old) is True
    assert old.stat().st_size < 0.6 * size
    kept = read_checkpoint_file(old)
    assert kept["exact_weights"] == weights_fingerprint(ema)
    assert kept["kept_dtype"] == str(KEPT_DTYPE)
    again = old.read_bytes()
    assert compact_kept_file(old) is False and old.read_bytes() == again
