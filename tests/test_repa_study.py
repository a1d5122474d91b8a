"""pf.experiments.repa: PF against PF + REPA end to end at the toy size (every stage, the page,
PF's points shared with the main comparison's by key)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch_fidelity")

from pf.data.mnist_format import FASHION_MNIST_DIR  # noqa: E402
from pf import cli  # noqa: E402
from pf.experiments import common, repa  # noqa: E402
from pf.experiments.command import study_config  # noqa: E402

needs_fashion = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")


def test_the_repa_arm_aligns_to_another_classifier_than_the_fid_one():
    study = repa.DEFAULTS
    overrides = repa.repa_overrides(study)
    assert "trainer.repa.enabled=true" in overrides and f"trainer.repa.weights={repa.encoder_path(study)}" in overrides
    assert repa.encoder_path(study) != common.classifier_path(study)
    assert set(study["repa"]["nfe"]) <= set(study["eval"]["nfe"])  # PF's points are the comparison's


@needs_fashion
def test_repa_study_toy_end_to_end(tmp_path):
    argv = repa.expand_toy(["toy=true", f"out_dir={tmp_path / 'out'}", f"records_dir={tmp_path / 'records'}",
                            f"page={tmp_path / 'repa.md'}", "device=cpu"])
    cfg = cli.parse(repa.DEFAULTS, argv, free=repa.FREE)
    repa.main(cfg, argv=["toy=true"])
    data = repa.collect(study_config(cfg))
    assert all(seconds is not None for _, seconds in data["stages"])
    assert {p["target_nfe"] for p in data["curves"]["pf_ltg_repa"]} == {2, 4}
    assert {(p["train_seed"], p["sample_seed"]) for p in data["curves"]["pf_ltg"]} == {(0, 0), (0, 1)}
    tr = data["train"][("pf_ltg_repa", 0)]
    assert all("repa_loss" in r for r in tr["losses"]) and -1 <= tr["losses"][-1]["repa_loss"] <= 1
    (al,) = data["alignment"]
    assert al["images"] == 40 and [r["t"] for r in al["times"]] == [0.5] and -1 <= al["times"][0]["cosine"] <= 1
    text = (tmp_path / "repa.md").read_text()
    assert "python -m pf.experiments.repa toy=true" in text and "| PF (LTG) + REPA |" in text
    assert "pending" not in text and "Held-out alignment" in text and "REPA against PF at the same K" in text
    # one training run per model: the difference is set beside what retraining one run changed
    import json

    records = tmp_path / "records"
    point = next(p for p in sorted((records / "points").glob("*.json"))
                 if json.loads(p.read_text())["key"]["sampler"] == "euler_pf")
    earlier = json.loads(point.read_text())
    earlier["result"] = {**earlier["result"], "fid": earlier["result"]["fid"] - 0.5, "weights": "earlier"}
    (records / "superseded").mkdir()
    (records / "superseded" / point.name).write_text(json.dumps(earlier))
    repa.main(cli.parse(repa.DEFAULTS, [*argv, "report_only=true"], free=repa.FREE), argv=["toy=true"])
    text = (tmp_path / "repa.md").read_text()
    assert "the same PF run retrained on another machine moved its FID by +0.50 on average" in text
