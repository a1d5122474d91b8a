"""pf.experiments.reproduce end to end at the toy size (Fashion-MNIST 8x8, a few steps): every
arm trains, every curve is evaluated on every (training, sampling) seed against the held-out
test split, RESULTS.md, the plot and the grid are written, a rerun reuses everything, and
the matched-NFE step counts."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch_fidelity")
pytest.importorskip("matplotlib")

from pf import samplers  # noqa: E402
from pf.data.mnist_format import FASHION_MNIST_DIR  # noqa: E402
from pf import cli  # noqa: E402
from pf.experiments import command, common, curves, reproduce  # noqa: E402
from pf.experiments.comparison import ARMS  # noqa: E402

needs_fashion = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")


def test_steps_for_nfe_matches_the_budget():
    assert curves.steps_for_nfe(samplers.EulerPF(), 20) == 20
    assert curves.steps_for_nfe(samplers.DualLoop(n_inner=4), 20) == 5
    assert curves.steps_for_nfe(samplers.DualLoop(n_inner=4), 10) == 2  # 8 and 12 tie: the cheaper
    la = samplers.LookAhead()
    k = curves.steps_for_nfe(la, 50)
    assert abs(la.expected_nfe(k) - 50) <= 1 and la.expected_nfe(k) <= 50


def test_the_default_study_is_the_papers_comparison():
    cfg = cli.parse(reproduce.DEFAULTS, [])
    study = command.study_config(cfg)
    assert study["data"] == "fashion_mnist" and len(study["train"]["seeds"]) >= 2 and len(study["eval"]["seeds"]) >= 3
    assert study["eval"]["nfe"] == [10, 25, 50, 100] and study["eval"]["cfg_scale"] == 1.0
    assert ARMS["sit_uniform"]["overrides"] == ["trainer=fm", "trainer.timesteps.name=uniform"]
    names = [s.name for s in reproduce.build_stages(study)]
    for arm in ("sit_uniform", "sit_logit_normal", "pf_ltg", "pf_logit_normal"):
        assert f"train {arm} seed 0" in names and f"train {arm} seed 1" in names
    assert "curve pf_ltg look_ahead seed 0" in names and "curve sit_uniform euler seed 1" in names
    assert "curve pf_ltg euler_pf seed 1" in names and "curve pf_ltg look_ahead seed 1" not in names  # adaptive: seed 0
    # every stage that reads a model runs right after that model's training (a study continued in a
    # fresh clone, without the models, retrains only the arm it stopped in)
    for i, name in enumerate(names):
        if name.startswith(("curve ", "profile ")):
            arm, seed = name.split()[1], name.split()[-1]
            assert [n for n in names[:i] if n.startswith("train ")][-1] == f"train {arm} seed {seed}", name
    assert all(n.startswith("trend ") for n in names[-2:])  # after every training seed's comparison
    # stage keys do not depend on how the study is run or where it reports
    other = command.study_config(cli.parse(reproduce.DEFAULTS, ["jobs=2", "results=/tmp/x.md"]))
    assert [s.key for s in reproduce.build_stages(other)] == [s.key for s in reproduce.build_stages(study)]
    # nor on which other stages exist: a longer trend or fewer arms re-keys only the trend
    keys = {s.name: s.key for s in reproduce.build_stages(study)}
    layout = command.study_config(cli.parse(reproduce.DEFAULTS, ["eval.trend_steps=[500]", "arms=[pf_ltg,sit_uniform]",
                                                                   "eval.adaptive_train_seeds=[0,1]"]))
    changed = {s.name for s in reproduce.build_stages(layout) if keys.get(s.name, s.key) != s.key}
    assert changed == {"trend pf_ltg seed 0", "trend sit_uniform seed 0"}
    # what a stage computes does re-key it: training stages do not see the evaluation settings
    recipe = command.study_config(cli.parse(reproduce.DEFAULTS, ["train.lr=0.002", "eval.num_samples=10"]))
    rekeyed = {s.name: s.key != keys[s.name] for s in reproduce.build_stages(recipe)}
    assert all(rekeyed.values())
    sampling = command.study_config(cli.parse(reproduce.DEFAULTS, ["eval.num_samples=10"]))
    rekeyed = {s.name: s.key != keys[s.name] for s in reproduce.build_stages(sampling)}
    assert not any(v for n, v in rekeyed.items() if n.startswith("train ")) and rekeyed["curve pf_ltg euler_pf seed 0"]
    with pytest.raises(ValueError, match="global-time model"):
        reproduce.build_stages({**study, "eval": {**study["eval"], "samplers": {"sit_uniform": ["look_ahead"]}}})
    # SiT's own samplers are a SiT arm's curves, every training seed (they are not adaptive)
    sit = reproduce.build_stages({**study, "eval": {**study["eval"], "samplers": {"sit_uniform": ["euler", "heun", "sde"]}}})
    assert {s.name for s in sit if s.name.startswith("curve sit_uniform")} == {
        f"curve sit_uniform {n} seed {t}" for n in ("euler", "heun", "sde") for t in (0, 1)}


@needs_fashion
def test_reproduce_toy_end_to_end(tmp_path):
    argv = reproduce.expand_toy(["toy=true", f"out_dir={tmp_path / 'out'}", f"records_dir={tmp_path / 'records'}", f"results={tmp_path / 'RESULTS.md'}",
                                 f"figures={tmp_path / 'fig'}", "device=cpu"])
    cfg = cli.parse(reproduce.DEFAULTS, argv, free=reproduce.FREE)
    reproduce.main(cfg, argv=["toy=true"])
    study = command.study_config(cfg)
    data = reproduce.collect(study)
    assert all(seconds is not None for _, seconds in data["stages"])  # every stage finished
    assert len(data["train"]) == 8  # 4 arms x 2 training seeds
    pf_run, sit_run = data["train"][("pf_ltg", 0)], data["train"][("sit_uniform", 0)]
    assert pf_run["flops_per_step"] > sit_run["flops_per_step"] > 0  # per-token modulation costs more
    assert pf_run["steps"] == 4 and pf_run["train_seconds"] > 0
    for (arm, sampler), points in data["curves"].items():
        assert {(p["train_seed"], p["sample_seed"]) for p in points} == {(0, 0), (0, 1), (1, 0), (1, 1)}
        for p in points:
            assert p["num_reference"] == 200 and p["num_generated"] == 20 and p["nfe"] >= 1
    text = (tmp_path / "RESULTS.md").read_text()
    assert "python -m pf.experiments.reproduce toy=true" in text and "pending" not in text
    assert "| PF (LTG) dual-loop | " in text and "(K=1, NFE 4)" in text and "SiT (uniform t) Euler" in text
    assert "held-out **test split**" in text and "paired" in text
    assert (tmp_path / "fig" / "fid_vs_nfe.png").stat().st_size > 0 and (tmp_path / "fig" / "samples.png").is_file()
    # the trend continues the trajectory past the comparison's 4 steps, every K at each length
    trend = data["trend"]["pf_ltg"]
    assert {(p["train_steps"], p["steps"]) for p in trend} == {(2, 2), (2, 4), (6, 2), (6, 4)}
    assert "| PF (LTG) | 6 | " in text and (tmp_path / "fig" / "trend.png").stat().st_size > 0
    # where along the path each network is wrong, beside where its training put the times
    prof = data["profile"]["sit_uniform"]
    assert len(prof["mse"]) == len(study["eval"]["profile_times"]) and all(m > 0 for m in prof["mse"])
    assert abs(sum(prof["train_time_bins"]) - 1) < 1e-9 and abs(prof["train_time_bins"][-1] - 0.1) < 0.03  # uniform
    assert data["profile"]["pf_ltg"]["train_time_bins"][-1] < 0.05  # LTG keeps patches below their sample's time
    assert "## Why more sampling steps do not help here" in text and (tmp_path / "fig" / "profile.png").is_file()

    # a rerun computes nothing (every stage cached) and writes the same report
    (tmp_path / "RESULTS.md").unlink()
    reproduce.main(cfg, argv=["toy=true"])
    assert (tmp_path / "RESULTS.md").read_text().split("## Stages")[0] == text.split("## Stages")[0]

    # a fresh clone has the records but no trained runs: a curve whose points are all stored
    # finishes from them without retraining its arm
    import shutil

    from pf.experiments.stages import stage_file

    curve = next(s for s in reproduce.build_stages(study) if s.name == "curve pf_ltg euler_pf seed 0")
    stage_file(study["records_dir"], curve).unlink()
    shutil.rmtree(tmp_path / "out")
    reproduce.main(cfg, argv=["toy=true"])
    assert not (tmp_path / "out" / "train").exists()
    assert (tmp_path / "RESULTS.md").read_text().split("## Stages")[0] == text.split("## Stages")[0]

    # ... and a point still to evaluate there is measured on the run's weights kept with the
    # records (no retraining: on another machine a retrained run is a slightly different model);
    # the feature classifier, whose file went with out_dir, is retrained to the same numbers
    import json

    from pf.experiments.records import config_key
    from pf.models.checkpoint import read_checkpoint_file

    kept = sorted((Path(study["records_dir"]) / "weights").glob("*.pt"))
    assert len(kept) == 8  # every arm and training seed at the comparison's length
    stage_file(study["records_dir"], curve).unlink()
    run = common.TrainedRun(study, ARMS["pf_ltg"]["overrides"], 0, study["train"]["steps"])
    key = curves.point_key(study, run.identity, "euler_pf", {}, 4, 1)
    point = Path(study["records_dir"]) / "points" / f"{config_key(key)}.json"
    before = json.loads(point.read_text())["result"]
    trained = data["train"][("pf_ltg", 0)]
    assert before["weights"] == trained["kept_weights"]  # measured on the weights kept with the records,
    assert read_checkpoint_file(run.checkpoint())["exact_weights"] == trained["weights"]  # rounded from that model
    point.unlink()
    reproduce.main(cfg, argv=["toy=true"])
    after = json.loads(point.read_text())["result"]
    assert not (tmp_path / "out" / "train").exists() and common.classifier_path(study).is_file()
    assert after["weights"] == before["weights"]
    assert after["fid"] == pytest.approx(before["fid"], rel=1e-6) and after["precision"] == before["precision"]

    # a point measured on an earlier realization of the run, kept in superseded/, is set beside it
    superseded = Path(study["records_dir"]) / "superseded"
    superseded.mkdir()
    earlier = json.loads(point.read_text())
    earlier["result"] = {**earlier["result"], "fid": earlier["result"]["fid"] - 1.0, "weights": "earlier"}
    (superseded / point.name).write_text(json.dumps(earlier))
    reproduce.main(cli.parse(reproduce.DEFAULTS, [*argv, "report_only=true"], free=reproduce.FREE), argv=["toy=true"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## The same run trained twice" in text and "| PF (LTG) seed 0 | Euler | 4 | [1] |" in text
    assert "differs from the earlier realization's by +1.00 on average" in text


def _trend(fids: dict[int, list[float]]) -> list[dict]:
    return [{"train_steps": st, "steps": k, "fid": f, "precision": 0.8, "recall": 0.5, "val_loss": 0.2}
            for st, row in fids.items() for k, f in zip((10, 50, 100), row)]


def test_trend_statements_say_from_when_more_steps_help():
    rising_then_falling = _trend({1000: [10.0, 12.0, 13.0], 3000: [8.0, 8.5, 9.0], 12000: [6.0, 5.5, 5.0]})
    (line,) = reproduce.trend_statements({"pf_ltg": rising_then_falling}, [10, 50, 100])
    assert "+3.00 at 1000 steps, +1.00 at 3000 steps, -1.00 at 12000 steps" in line
    assert "The gap falls with every stage" in line and "from 12000 training steps on" in line
    assert "best K is 10 at 1000 steps, 10 at 3000 steps, 100 at 12000 steps" in line
    never = _trend({1000: [10.0, 12.0, 13.0], 3000: [8.0, 9.5, 9.0]})
    (line,) = reproduce.trend_statements({"sit_uniform": never}, [10, 50, 100])
    assert "At no training length here" in line and "does not fall steadily" not in line
    # a training length with a K still pending is left out, not guessed
    partial = [p for p in rising_then_falling if not (p["train_steps"] == 12000 and p["steps"] == 100)]
    (line,) = reproduce.trend_statements({"pf_ltg": partial}, [10, 50, 100])
    assert "12000" not in line


def test_segment_table_marks_the_best_arm_per_time():
    study = {"arms": ["sit_uniform", "pf_ltg"], "train": {"seeds": [0, 1], "steps": 3000}}
    data = {"train": {("sit_uniform", 0): {"val_segments": [0.1, 0.5]}, ("sit_uniform", 1): {"val_segments": [0.3, 0.5]},
                      ("pf_ltg", 0): {"val_segments": [0.4, 0.2]}, ("pf_ltg", 1): {}}}
    lines = reproduce.segment_table(study, data)
    assert lines[-4].endswith("| t=0.25 | t=0.75 | mean |")
    assert lines[-2] == "| SiT (uniform t) | 2 | **0.2000** | 0.5000 | 0.3500 |"
    assert lines[-1] == "| PF (LTG) | 1 | 0.4000 | **0.2000** | 0.3000 |"
    assert reproduce.segment_table(study, {"train": {}}) == []


def _points(fids: dict[tuple[int, int], list[float]], targets=(10, 50)) -> list[dict]:
    """(training seed, sampling seed) -> FID per target NFE (None: not measured yet)."""
    return [{"target_nfe": n, "steps": n, "nfe": n, "train_seed": ts, "sample_seed": ss, "fid": f,
             "precision": 0.8, "recall": 0.5}
            for (ts, ss), row in fids.items() for n, f in zip(targets, row) if f is not None]


def test_columns_set_side_by_side_use_only_the_runs_they_all_have():
    """A curve with two training seeds beside one with a single seed: the table names each row's
    seeds (and a cell's, where a curve is still running), and the paper's ordering and the
    falls-with-NFE statements compare means over the same models and noise only."""
    study = {"arms": ["sit_uniform", "pf_ltg"], "eval": {"nfe": [10, 50]}}
    data = {"curves": {
        # seed 1 is much better: mixed in, it would flip the ordering against the seed-0-only columns
        ("sit_uniform", "euler"): _points({(0, 0): [14.0, 13.0], (1, 0): [4.0, 3.0]}),
        ("pf_ltg", "euler_pf"): _points({(0, 0): [13.0, 12.0], (1, 0): [12.0, None]}),
        ("pf_ltg", "dual_loop"): _points({(0, 0): [12.0, 11.0]}),
        ("pf_ltg", "look_ahead"): _points({(0, 0): [11.0, 10.0]})}}
    table = reproduce.nfe_table(data, [10, 50], lambda runs: f"{sum(r['fid'] for r in runs) / len(runs):.1f}")
    assert table[0] == "| model + sampler | training seeds | NFE ~10 | NFE ~50 |"
    assert table[2] == "| SiT (uniform t) Euler | 0, 1 | 9.0 | 8.0 |"
    assert table[3] == "| PF (LTG) Euler | 0, 1 | 12.5 | 12.0 [seeds 0] |"
    assert table[4] == "| PF (LTG) dual-loop | 0 | 12.0 | 11.0 |"
    text = "\n".join(reproduce.statements(study, data))
    assert ("The paper's ordering (SiT > PF Euler > dual-loop > look-ahead in FID) at NFE ~10: **reproduced** "
            "(SiT (uniform t) Euler 14.00, PF (LTG) Euler 13.00, PF (LTG) dual-loop 12.00, PF (LTG) look-ahead 11.00; "
            "over the 1 run all four have, training seed 0)") in text
    # PF Euler's NFE ~50 has seed 0 only, so its falls-with-NFE statement uses seed 0 at both NFEs
    assert "PF (LTG) Euler: FID falls with every step of NFE (13.00, 12.00; training seed 0)" in text
    assert "SiT (uniform t) Euler: FID falls with every step of NFE (9.00, 8.00; training seeds 0, 1)" in text
