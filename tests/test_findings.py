"""pf.experiments.findings: the per-patch statistics and rank correlations against direct
computations, and the five findings end to end at the toy size (page, plots, every stage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity")
pytest.importorskip("matplotlib")
scipy_stats = pytest.importorskip("scipy.stats")

from pf.data.mnist_format import FASHION_MNIST_DIR  # noqa: E402
from pf import cli  # noqa: E402
from pf.experiments import common, findings  # noqa: E402
from pf.experiments.command import study_config  # noqa: E402


def test_patch_stats_are_patch_means_of_variance_and_error():
    g = torch.Generator().manual_seed(0)
    v, target = torch.randn(2, 3, 4, 6, generator=g), torch.randn(2, 3, 4, 6, generator=g)
    logvar = torch.randn(2, 1, 4, 6, generator=g)
    var, err = common.patch_stats(v, logvar, target, 2)
    assert var.shape == err.shape == (2, 6)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                n = i * 3 + j  # raster order over the 2 x 3 patch grid
                sl = (b, slice(None), slice(2 * i, 2 * i + 2), slice(2 * j, 2 * j + 2))
                assert torch.isclose(var[b, n], torch.exp(logvar[sl].double()).mean())
                assert torch.isclose(err[b, n], ((v[sl].double() - target[sl].double()) ** 2).mean())


def test_within_image_rank_correlation_is_spearman_per_row():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    b[0] = a[0] ** 3  # a monotone relation: rank correlation 1
    got = findings._row_corr(findings._rank_rows(a), findings._rank_rows(b))
    want = [scipy_stats.spearmanr(a[i], b[i]).statistic for i in range(5)]
    assert np.allclose(got, want) and np.isclose(got[0], 1.0)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_stages_that_read_one_model_run_together():
    study = study_config(cli.parse(findings.DEFAULTS, []))
    names = [s.name for s in findings.build_stages(study)]
    # each stage listed with the model it reads; a model's stages are consecutive (a study continued in a
    # fresh clone, without the models, retrains only the one it stopped at)
    seed0 = study["findings"]["ablation"]["seed"]
    model = {n: ("ablation", n) for n in names if n.startswith("ablation ")}
    model.update({n: ("pf_ltg", int(n.split()[-1])) for n in names if n.startswith("selection ")})
    model.update({n: (n.split()[1], int(n.split()[-1])) for n in names if n.startswith("uncertainty ")})
    model.update({"ablation ltg": ("pf_ltg", seed0), "ablation logit_normal": ("pf_logit_normal", seed0)})
    order = [model[n] for n in names if n in model]
    assert len(order) == len(names) - 1 == 17  # every stage but the classifier reads a model
    runs = [m for i, m in enumerate(order) if i == 0 or order[i - 1] != m]
    assert len(runs) == len(set(runs)), runs  # no model is loaded again after another one
    assert names.index("uncertainty pf_ltg seed 0") < names.index("selection look_ahead random seed 0") < names.index(
        "uncertainty pf_logit_normal seed 0")


def test_findings_toy_end_to_end(tmp_path):
    argv = findings.expand_toy(["toy=true", f"out_dir={tmp_path / 'out'}", f"records_dir={tmp_path / 'records'}", f"page={tmp_path / 'findings.md'}",
                                f"figures={tmp_path / 'fig'}", "device=cpu"])
    cfg = cli.parse(findings.DEFAULTS, argv, free=findings.FREE)
    findings.main(cfg, argv=["toy=true"])
    study = study_config(cfg)
    data = findings.collect(study)
    assert all(s is not None for _, s in data["stages"])
    assert {(r["arm"], r["seed"]) for r in data["uncertainty"]} == {(a, s) for a in ("pf_ltg", "pf_logit_normal")
                                                                    for s in (0, 1)}
    for r in data["uncertainty"]:
        assert [t["s"] for t in r["times"]] == [0.3, 0.7]
        for t in r["times"]:
            assert -1 <= t["spearman_pooled"] <= 1 and len(t["bins"]) >= 2
            assert set(t["context"]) == {"model", "true", "other"} and t["context_t"] > t["s"]
            assert all(0 <= c["err_lower_frac"] <= 1 and c["var"] > 0 for c in t["context"].values())
    assert set(data["ablation"]) == {"independent", "ltg"}
    assert set(data["selection"]) == {(s, r) for s in ("dual_loop", "look_ahead")
                                      for r in ("uncertainty", "random", "most_uncertain")}
    page = (tmp_path / "findings.md").read_text()
    for heading in ("## 1. Uncertainty", "## 2 and 3. Context", "## 4. The timestep-sampler ablation",
                    "## 5. Patch selection"):
        assert heading in page
    assert "python -m pf.experiments.findings toy=true" in page and "pending" not in page
    assert "control (other image)" in page and "- Control, the same patches holding another image's values" in page
    assert "one training run per sampler, seed 0" in page  # the toy ablation: both of its samplers measured
    for name in ("uncertainty.png", "difficulty_maps.png", "ablation.png", "selection.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 0


def _ablation_record(fids: list[float]) -> dict:
    return {"points": [{"sampler": "euler_pf", "target_nfe": 25, "train_seed": 0, "sample_seed": i, "fid": f}
                       for i, f in enumerate(fids)]}


def test_the_ablation_verdict_waits_for_every_sampler():
    fc = {"ablation": {"samplers": ["independent", "uniform", "ltg"], "eval": [["euler_pf", 25]], "seed": 0}}
    ab = {"ltg": _ablation_record([10.0, 10.5]), "independent": _ablation_record([20.0, 21.0])}
    text = " ".join(findings.ablation_statements(fc, ab))
    assert "of the 2 of 3 samplers measured: ltg 10.25, independent 20.50" in text
    assert "No verdict until uniform is measured" in text and "LTG is" not in text
    ab["uniform"] = _ablation_record([9.0, 9.5])
    text = " ".join(findings.ablation_statements(fc, ab))
    assert "LTG is **not** best (rank 2 of 3), against the paper" in text
    assert "independent per-patch times rank 3 of 3, performing poorly as the paper says" in text
    assert "one training run per sampler, seed 0" in text
