"""The study framework apart from any one study: the command body (toy sizes, report-only, the
report rewritten as stages finish), which settings a stage sees, the report's numbers against
direct computations, a curve's points by NFE, and the shared bar figure."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pf.experiments import command, comparison, curves, summary
from pf.experiments.records import cached, cached_result, write_json
from pf.experiments.stages import Stage


def count_stage(log: str, name: str) -> dict:
    """A stage: appends its name to ``log``."""
    with open(log, "a") as f:
        f.write(name + "\n")
    return {"name": name}


def _study_cfg(tmp_path, **extra):
    return OmegaConf.create({"records_dir": str(tmp_path / "records"), "page": str(tmp_path / "page.md"), "jobs": 1,
                             "threads": 1, "toy": False, "report_only": False, **extra})


def _build(study: dict) -> list[Stage]:
    log = str(Path(study["records_dir"]).parent / "calls.txt")
    return [Stage("a", f"{__name__}:count_stage", {"log": log, "name": "a"}),
            Stage("b", f"{__name__}:count_stage", {"log": log, "name": "b"}, deps=("a",))]


def test_run_study_runs_the_stages_and_rewrites_the_report_as_they_finish(tmp_path, capsys):
    reports = []

    def report(study, command_line):
        reports.append(command_line)
        Path(study["page"]).write_text(command_line)

    cfg = _study_cfg(tmp_path)
    command.run_study(cfg, ["x=1", "report_only=false", "y=a b"], _build, report, "python -m study", "page")
    assert (tmp_path / "calls.txt").read_text().split() == ["a", "b"]
    # after each stage and once at the end; the command line without report_only, quoted for a shell
    assert reports == ["python -m study x=1 'y=a b'"] * 3
    assert (tmp_path / "page.md").read_text() == reports[-1] and "wrote " in capsys.readouterr().out
    # report_only: nothing runs (a new stage stays undone), the report is written once
    reports.clear()
    (tmp_path / "calls.txt").unlink()
    command.run_study(_study_cfg(tmp_path, report_only=True), [], lambda s: [*_build(s), Stage(
        "c", f"{__name__}:count_stage", {"log": "unused", "name": "c"})], report, "python -m study", "page")
    assert reports == ["python -m study"] and not (tmp_path / "calls.txt").exists()


def test_toy_expansion_and_the_study_dict():
    toy = ["train.steps=4", "eval.nfe=[2,4]"]
    assert command.expand_toy(["train.steps=8"], toy) == ["train.steps=8"]  # no toy=true: unchanged
    # the toy sizes first, so an explicit argument still wins
    assert command.expand_toy(["toy=true", "train.steps=8"], toy) == [*toy, "toy=true", "train.steps=8"]
    assert command.expand_toy(["+toy=True"], toy)[:2] == toy
    study = command.study_config(OmegaConf.create({"a": 1, "toy": True, "report_only": False, "b": "${a}"}))
    assert study == {"a": 1, "b": 1}


def test_a_stage_sees_no_layout_and_training_sees_no_evaluation():
    study = {**comparison.DEFAULTS, "arms": ["pf_ltg"], "results": "R.md",
             "eval": {**comparison.DEFAULTS["eval"], "trend_steps": [1], "profile_times": [0.5]}}
    seen = comparison.stage_study(study)
    assert not set(seen) & set(comparison.LAYOUT_KEYS)
    assert "trend_steps" not in seen["eval"] and "profile_times" not in seen["eval"] and "nfe" in seen["eval"]
    assert comparison.stage_study(study, keep_eval=("trend_steps",))["eval"]["trend_steps"] == [1]
    assert comparison.stage_study(study, keep=("arms",))["arms"] == ["pf_ltg"]
    training = comparison.stage_study(study, evaluation=False)
    assert "eval" not in training and "classifier" not in training and training["train"] == study["train"]
    assert comparison.euler_sampler(comparison.ARMS["sit_uniform"]["overrides"]) == "euler"
    assert comparison.euler_sampler(comparison.ARMS["pf_ltg"]["overrides"]) == "euler_pf"


def test_report_numbers_match_direct_computations():
    values = [3.0, 5.5, 4.25, 8.0]
    m, s = summary.mean_std(values)
    assert m == pytest.approx(statistics.mean(values)) and s == pytest.approx(statistics.stdev(values))
    assert summary.mean_std([2.0]) == (2.0, 0.0) and summary.fmt([]) == "pending"
    assert summary.fmt([1.0, 2.0]) == f"1.50 ± {statistics.stdev([1.0, 2.0]):.2f}"
    a = {(0, 0): {"fid": 10.0}, (0, 1): {"fid": 12.0}, (1, 0): {"fid": 9.0}}
    b = {(0, 0): {"fid": 9.0}, (0, 1): {"fid": 12.5}, (2, 0): {"fid": 1.0}}
    assert summary.paired(a, b) == [-1.0, 0.5]  # only the runs both have, in key order
    spread = statistics.stdev([-1.0, 0.5])
    assert summary.verdict([-1.0, 0.5]) == f"-0.25 ± {spread:.2f}, better in 1, worse in 1 of 2 paired runs"
    assert summary.verdict([-1.0, -2.0]).endswith("better in all 2 paired runs")
    assert summary.verdict([1.0, 0.0]).endswith("better in 0, worse in 1, equal in 1 of 2 paired runs")
    assert summary.verdict([]) == "not measured yet"
    assert summary.rel("/a/docs/study/x.png", "/a/RESULTS.md") == "docs/study/x.png"
    assert summary.stage_table([("train", 90.0), ("curve", None)])[-2:] == ["| train | 1.5 |", "| curve | pending |"]


def test_a_curve_by_nfe_and_its_sampler_parameters():
    points = [{"target_nfe": n, "train_seed": t, "sample_seed": s, "fid": n + t + s}
              for n in (10, 50) for t in (0, 1) for s in (0, 1)]
    ser = curves.series(points)
    assert sorted(ser) == [10, 50] and ser[50][(1, 0)]["fid"] == 51
    study = {"eval": {"dual_loop": {"p": 0.4, "n_inner": 4}, "nfe": [8, 20]}}
    assert curves.sampler_params(study, "dual_loop") == {"p": 0.4, "n_inner": 4}
    assert curves.sampler_params(study, "euler_pf") == {}
    assert curves.curve_points(study, "dual_loop") == [(8, 2), (20, 5)]  # 4 model calls a step (n_inner=4)


def test_cached_results_and_atomic_records(tmp_path):
    assert cached_result(tmp_path, "points", {"k": 1}) is None
    assert cached(tmp_path, "points", {"k": 1}, lambda: {"v": 3}) == {"v": 3}
    assert cached_result(tmp_path, "points", {"k": 1}) == {"v": 3}
    write_json(tmp_path / "sub" / "r.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"a": [1, 2]}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]  # no temp file left behind


def test_bars_draw_every_group(tmp_path):
    pytest.importorskip("matplotlib")
    from pf.experiments import plots

    path = tmp_path / "fig" / "bars.png"
    plots.bars([("Euler", [("ltg", [1.0, 2.0]), ("uniform", [3.0])]), ("look-ahead", [("ltg", [])])], path,
               "title", "FID")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_framework_imports_no_study_and_no_study_imports_another():
    """Studies build on the framework only: a study's module can change (or go) without
    touching the others, and the framework never reaches up into a study."""
    import ast

    import pf.experiments as package

    studies = {"reproduce", "findings", "repa", "t2i", "evidence", "diagnostics", "feature_spaces", "inpaint"}
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pf.experiments":
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pf.experiments."):
                imported.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[2] for a in node.names if a.name.startswith("pf.experiments.")}
        assert not imported & studies, f"{path.name} imports the study {sorted(imported & studies)}"
