"""pf.experiments.reproduce end to end at a toy size: both models train, every column is
evaluated at the same K and at matched NFE, RESULTS.md and the grid are written and can be
re-rendered; the matched-NFE step counts."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("torch_fidelity")

from pf import samplers  # noqa: E402
from pf.eval import cli  # noqa: E402
from pf.experiments import reproduce  # noqa: E402


def test_steps_for_nfe_matches_the_budget():
    assert reproduce.steps_for_nfe(samplers.EulerPF(), 20) == 20
    assert reproduce.steps_for_nfe(samplers.DualLoop(n_inner=4), 20) == 5
    la = samplers.LookAhead()
    k = reproduce.steps_for_nfe(la, 20)
    assert abs(la.expected_nfe(k) - 20) <= 1 and la.expected_nfe(k) <= 20  # ties go to the cheaper K


def test_columns_cover_both_tables():
    cfg = cli.parse(reproduce.DEFAULTS, ["eval.steps=10", "eval.nfe=20"])
    cols = reproduce.columns(cfg)
    same = [c for c in cols if c["table"] == "steps"]
    matched = [c for c in cols if c["table"] == "nfe"]
    assert [reproduce.label(c) for c in same] == ["SiT Euler", "PF Euler", "PF dual-loop", "PF look-ahead"]
    assert all(c["steps"] == 10 for c in same)
    assert [c["nfe"] for c in same] == [10, 10, 40, 19]
    assert all(abs(c["nfe"] - 20) <= 1 for c in matched)
    assert len(cfg.eval.seeds) >= 3  # the report's spread is over at least three seeds


def test_reproduce_end_to_end_toy(tmp_path):
    argv = [f"out_dir={tmp_path / 'out'}", f"results={tmp_path / 'RESULTS.md'}", f"grid={tmp_path / 'grid.png'}",
            "train.max_steps=2", "train.batch_size=8", "train.warmup_steps=1", "eval.num_samples=20",
            "eval.seeds=[0,1]", "eval.steps=2", "eval.nfe=4", "eval.kid_subsets=2", "classifier.epochs=1",
            "classifier.width=4", "grid_rows=1", "device=cpu"]
    cfg = cli.parse(reproduce.DEFAULTS, argv)
    results = reproduce.run(cfg, log=lambda *_: None)

    assert set(results["train"]) == {"fm_seed0", "pf_seed0"}
    assert results["train"]["fm_seed0"]["steps"] == results["train"]["pf_seed0"]["steps"] == 2
    assert results["train"]["fm_seed0"]["params"] < results["train"]["pf_seed0"]["params"]  # PF adds the logvar head
    cols = results["columns"]
    assert len(cols) == 8
    for col in cols:
        assert len(col["runs"]) == 2 and {r["sample_seed"] for r in col["runs"]} == {0, 1}
        assert col["nfe_measured"] == col["nfe"]
        assert all(torch.isfinite(torch.tensor(r["fid"])) for r in col["runs"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "python -m pf.experiments.reproduce" in text and "pending" not in text
    assert "| SiT Euler | 2 | 2 |" in text and "| PF dual-loop | 2 | 8 |" in text and "| PF dual-loop | 1 | 4 |" in text
    assert "±" in text and "grid.png" in text
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["finished"]

    # a second run reuses the trained models; report_only re-renders without computing
    (tmp_path / "RESULTS.md").unlink()
    cli.run(reproduce.main, reproduce.DEFAULTS, "", argv=argv + ["report_only=true"])
    assert (tmp_path / "RESULTS.md").read_text() == text
