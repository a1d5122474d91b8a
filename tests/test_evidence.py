"""The evidence study (pf.experiments.evidence): the recipe's cosine schedule, the committed
feature spaces and their fingerprints, the resolution-shifted LTG arm, the stage order a
partial run is most useful in, SiT's own samplers added without changing a key of the stages
before them, a report that refuses a point of another classifier or of a run trained again to
another model (and ``supersede`` moving the earlier model's records aside), and the study end
to end at the toy size (two arms)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from pf import cli
from pf.data.mnist_format import FASHION_MNIST_DIR
from pf.encoders.classifier import SmallCNN, load_classifier, save_classifier_safetensors
from pf.experiments import command, evidence, spaces
from pf.experiments.trajectories import ensure_trained, trajectory_config
from pf.experiments.common import kept_weights_path
from pf.experiments.realizations import run_point_files
from pf.experiments.records import config_key
from pf.models.checkpoint import read_checkpoint_file, save_checkpoint
from pf.training.schema import compose_config

ROOT = Path(__file__).resolve().parents[1]
needs_fashion = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")


def study(*argv: str) -> dict:
    return command.study_config(cli.parse(evidence.DEFAULTS, list(argv), free=evidence.FREE))


def test_older_runs_keep_their_key_and_a_decaying_run_names_its_horizon():
    """Options that are off compute what a run from before them computed: the first study's kept
    weights (committed) are still found by its config; a cosine run is keyed by its horizon."""
    from pf.experiments import reproduce
    from pf.experiments.common import TrainedRun, kept_weights_path
    from pf.experiments.comparison import ARMS
    s = command.study_config(cli.parse(reproduce.DEFAULTS, [], free=reproduce.FREE))
    for arm in ARMS:
        for seed in (0, 1):
            run = TrainedRun(s, ARMS[arm]["overrides"], seed, 3000)
            assert kept_weights_path(s, run.identity).is_file(), (arm, seed)
    base = ["data=fashion_mnist", "model=tiny", "trainer.lr_schedule=cosine"]
    a = trajectory_config(compose_config([*base, "trainer.max_steps=300"]))
    b = trajectory_config(compose_config([*base, "trainer.max_steps=900"]))
    assert a["trainer"]["decay_horizon"] == 300 and config_key(a) != config_key(b)


def test_in_loop_fid_with_its_default_extractor_keeps_the_key_of_runs_from_before_the_option():
    base = ["data=fashion_mnist", "model=tiny", "trainer.fid_every=5"]
    before = trajectory_config(compose_config(base))
    assert "fid_extractor" not in before["trainer"]
    classifier = trajectory_config(compose_config([*base, "trainer.fid_extractor=classifier"]))
    assert config_key(classifier) == config_key(before)
    inception = trajectory_config(compose_config([*base, "trainer.fid_extractor=inception"]))
    assert inception["trainer"]["fid_extractor"] == "inception" and config_key(inception) != config_key(before)


def test_the_recipe_decays_over_the_study_steps():
    cfg = evidence.compose_train_config(evidence.recipe(study()), evidence.arms(study())["pf_ltg"]["overrides"], 0)
    tc = cfg.trainer
    assert (tc.lr_schedule, tc.min_lr, tc.max_steps, tc.ema_decay, tc.ema_warmup) == ("cosine", 1e-5, 4000, 0.999, True)
    with pytest.raises(ValueError, match="decays over trainer.max_steps=4000"):
        ensure_trained(cfg, "/nonexistent-never-written", 2000)


def test_a_stopped_run_resumes_from_a_checkpoint_sooner_than_the_kept_ones():
    from pf.experiments import common
    cfg = evidence.compose_train_config(evidence.recipe(study()), evidence.arms(study())["pf_ltg"]["overrides"], 0)
    assert (cfg.trainer.keep_every, cfg.trainer.ckpt_every) == (1000, common.RESUME_EVERY) and common.RESUME_EVERY < 1000
    before = copy.deepcopy(cfg)
    before.trainer.ckpt_every = before.trainer.keep_every  # the cadence before: runs trained then keep their key
    assert config_key(trajectory_config(cfg)) == config_key(trajectory_config(before))


def test_classifier_safetensors_round_trip_and_fingerprint(tmp_path):
    torch.manual_seed(0)
    net = SmallCNN(1, 16, 10, 4)
    path = save_classifier_safetensors(tmp_path / "c.safetensors", net, {"seed": 3, "test_accuracy": 0.5}, "x")
    back, info = load_classifier(path)
    assert info["seed"] == 3 and info["data"] == "x"
    x = torch.randn(5, 1, 16, 16)
    torch.testing.assert_close(back.features(x), net.eval().features(x))
    fp = evidence.classifier_fingerprint(path)
    torch.manual_seed(1)
    other = save_classifier_safetensors(tmp_path / "d.safetensors", SmallCNN(1, 16, 10, 4), {}, "x")
    assert evidence.classifier_fingerprint(other) != fp and len(fp) == 12


def test_committed_feature_spaces_are_two_independent_classifiers():
    s = study()
    fps = [evidence.classifier_fingerprint(ROOT / p) for p in s["classifiers"]]
    assert len(set(fps)) == 2
    listed = json.loads((ROOT / "results" / "classifiers" / "classifiers.json").read_text())
    assert [c["fingerprint"] for c in listed["classifiers"]] == fps
    infos = [load_classifier(ROOT / p)[1] for p in s["classifiers"]]
    assert infos[0]["seed"] != infos[1]["seed"] and all(i["test_accuracy"] > 0.85 for i in infos)


def test_the_shifted_arm_follows_the_data_dimension():
    s = study()
    assert evidence.data_dim(s) == 16 * 16 * 1
    assert evidence.shifted_loc(256) == pytest.approx(0.7 + math.log(4))  # ln sqrt(4096 / 256)
    assert "trainer.timesteps.loc=2.0863" in evidence.arms(s)["pf_ltg_shifted"]["overrides"]


def test_seed_zero_of_every_arm_comes_first_and_the_late_arm_last():
    names = [x.name for x in evidence.build_stages(study()) if x.name.startswith("train")]
    early = ["pf_ltg", "sit_uniform", "pf_ltg_shifted", "pf_ltg_marginal"]
    assert names == [f"train {a} seed {s}" for s in (0, 1, 2) for a in early] + \
        [f"train sit_logit_normal seed {s}" for s in (0, 1, 2)]


def test_stage_keys_ignore_settings_outside_what_a_stage_computes():
    a = {x.name: x.key for x in evidence.build_stages(study())}
    b = {x.name: x.key for x in evidence.build_stages(study("results=elsewhere.md", "jobs=1", "arms=[pf_ltg]"))}
    assert all(a[n] == k for n, k in b.items() if n in a)


SIT_SAMPLER_SETTINGS = ("sit_samplers", "sit_sampler_nfe", "sit_sampler_seeds")


def test_sits_own_samplers_add_stages_and_change_no_key_of_the_stages_before_them():
    """A study without the samplers' settings (the study before them, whose records the running
    study wrote) has the same stages with the same keys, whatever those settings say; the new
    stages are the samplers', each right after its SiT seed's curve (and profile); and the
    committed floor record, written by the code before them, is still its stage's."""
    now = study()
    before = copy.deepcopy(now)
    for k in SIT_SAMPLER_SETTINGS:
        del before["eval"][k]
    old = {x.name: x.key for x in evidence.build_stages(before)}
    sit_arms = ("sit_uniform", "sit_logit_normal")
    for variant in (now, study("eval.sit_samplers=[heun]", "eval.sit_sampler_nfe=25", "eval.sit_sampler_seeds=[0,1]")):
        new = {x.name: x.key for x in evidence.build_stages(variant)}
        assert {n: new[n] for n in old} == old
        assert [n for n in new if n not in old] == [f"samplers {a} seed {s}" for a in sit_arms for s in (0, 1, 2)]
    stages = evidence.build_stages(now)
    names = [x.name for x in stages]
    # named by module, not __name__: python -m and device_call (an import) key a stage alike
    assert {x.fn.split(":")[0] for x in stages} == {"pf.experiments.evidence"}
    for s in (0, 1, 2):
        i = names.index(f"samplers sit_uniform seed {s}")
        assert names[i - 1 - (s == 0)] == f"curve sit_uniform seed {s}"
        assert stages[i].deps == (f"train sit_uniform seed {s}", f"curve sit_uniform seed {s}")
        assert stages[i].args["samplers"] == ["euler", "heun", "sde"] and stages[i].args["nfe"] == 100
    # the committed records (written by ``python -m``: their functions are ``__main__:...``) have
    # the arguments of their stages now, so the same keys
    records = [json.loads(f.read_text()) for f in (ROOT / now["records_dir"] / "stages").glob("*.json")]
    assert records
    for rec in records:
        stage = stages[names.index(rec["name"])]
        assert rec["args"] == stage.args and rec["fn"].split(":")[1] == stage.fn.split(":")[1], rec["name"]
    assert evidence.sit_sampler_steps(["euler", "heun", "sde"], 100) == [
        ("euler", {}, 100), ("heun", {}, 50), ("sde", evidence.SIT_SAMPLERS["sde"], 100)]  # Heun: 2 calls a step
    with pytest.raises(ValueError, match="unknown sampler"):
        evidence.build_stages(study("eval.sit_samplers=[euler,dopri5]"))
    off = {x.name for x in evidence.build_stages(study("eval.sit_samplers=[]"))}
    assert off == set(old)


def test_sits_best_sampler_is_the_lowest_mean_over_the_seeds_every_sampler_has():
    """The rule on made-up points: the lowest mean over the shared training seeds (not the most
    seed-wins), chosen in the first feature space; PF pairs with it on the same sampling seeds."""
    s = study("arms=[pf_ltg,sit_uniform]", "eval.sit_sampler_seeds=[0]")

    def pt(arm, ts, ss, k, fids, **kw):
        return {"arm": arm, "train_seed": ts, "sample_seed": ss, "steps": k, "nfe": 100,
                "spaces": [{"fid": f} for f in fids], **kw}
    # (first, second feature space) per training seed. First-space means: Euler 10, Heun 9.33, SDE
    # 10.67 (the SDE best on 2 of 3 seeds); second: Euler 9, Heun 9, SDE 7.67
    fids = {"euler": [(10.0, 9.0), (10.0, 9.0), (10.0, 9.0)], "heun": [(9.5, 9.5), (9.5, 9.5), (9.0, 8.0)],
            "sde": [(8.0, 7.0), (8.0, 7.0), (16.0, 9.0)]}
    sampler_points = [pt("sit_uniform", ts, 0, 50 if n == "heun" else 100, fids[n][ts], sampler=n, target_nfe=100)
                      for n in fids for ts in (0, 1, 2)]
    sampler_points.append(pt("sit_uniform", 3, 0, 100, (1.0, 1.0), sampler="sde", target_nfe=100))  # not shared
    points = [pt("pf_ltg", ts, ss, 100, (7.0 + ts + 10 * ss, 7.0)) for ts in (0, 1, 2) for ss in (0, 1)]
    data = {"points": points, "sampler_points": sampler_points}
    c = evidence.sampler_cells(s, data, 0)
    assert evidence.best_sampler(c, "sit_uniform", ["euler", "heun", "sde"], 100) == ("heun", [0, 1, 2])
    assert evidence.best_sampler(evidence.sampler_cells(s, data, 1), "sit_uniform", ["euler", "heun", "sde"],
                                 100) == ("sde", [0, 1, 2])  # the check may disagree; the report says so
    (pf, sit, best, pairs), = evidence.best_sampler_pairs(s, data)
    assert (pf, sit, best) == ("pf_ltg", "sit_uniform", "heun")
    assert pairs[0] == [(0, 7.0 - 9.5), (1, 8.0 - 9.5), (2, 9.0 - 9.0)]  # sampling seed 0 only (PF's seed 1: +10)
    assert pairs[1] == [(0, 7.0 - 9.5), (1, 7.0 - 9.5), (2, 7.0 - 8.0)]  # the same sampler in the second space
    assert evidence.best_sampler(c, "sit_logit_normal", ["euler"], 100) == (None, [])


def test_a_report_refuses_a_point_of_another_classifier():
    ok = {"arm": "pf_ltg", "train_seed": 0, "steps": 10, "spaces": [{"classifier": "a"}, {"classifier": "b"}]}
    evidence.check_one_space([ok], ["a", "b"])
    with pytest.raises(ValueError, match="re-measure it or drop it"):
        evidence.check_one_space([ok, {**ok, "spaces": [{"classifier": "c"}, {"classifier": "b"}]}], ["a", "b"])
    with pytest.raises(ValueError):
        evidence.check_one_space([{**ok, "spaces": [{"classifier": "a"}]}], ["a", "b"])  # one space missing


def test_a_report_refuses_a_point_of_a_retrained_model():
    # what a point names is the kept copy's fingerprint where the training kept one
    trained = {("pf_ltg", 0): {"weights": "w0"}, ("pf_ltg", 1): {"weights": "w1-exact", "kept_weights": "w1"}}
    ok = [{"arm": "pf_ltg", "train_seed": s, "steps": 10, "weights": f"w{s}"} for s in (0, 1)]
    evidence.check_one_realization(ok, trained)
    evidence.check_one_realization([{**ok[0], "arm": "sit_uniform"}], trained)  # no training record yet: nothing to check
    retrained = {**ok[1], "steps": 25, "weights": "w1-again"}  # the same run trained anew in a fresh clone
    with pytest.raises(ValueError, match=r"pf_ltg \(training seed 1, K=25\).*w1-again.*w1 its training"):
        evidence.check_one_realization(ok + [retrained], trained)
    with pytest.raises(ValueError, match="retrained"):
        evidence.check_one_realization([{k: v for k, v in ok[0].items() if k != "weights"}], trained)


def test_supersede_moves_the_records_of_another_model_aside_and_never_overwrites(tmp_path):
    from pf.experiments.realizations import supersede

    def record(kind: str, name: str, result: dict) -> Path:
        path = tmp_path / kind / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"key": {"name": name}, "result": result}))
        return path

    train = record("stages", "train", {"weights": "exact-old", "kept_weights": "old"})
    curve = record("stages", "curve", {"points": [{"weights": "old"}, {"weights": "new"}]})  # mixed: moved
    done = record("stages", "samplers", {"points": [{"weights": "new"}]})
    point = record("points", "p", {"weights": "old", "fid": 1.0})
    moves = supersede(tmp_path, [train, curve, done, point], "new")
    assert [a.name for a, _ in moves] == ["train.json", "curve.json", "p.json"] and done.is_file()
    assert {b.relative_to(tmp_path).as_posix() for _, b in moves} == {
        "superseded/stages/train.old.json", "superseded/stages/curve.new-old.json", "superseded/points/p.old.json"}
    assert json.loads((tmp_path / "superseded/points/p.old.json").read_text())["result"]["fid"] == 1.0
    again = record("points", "p", {"weights": "old", "fid": 2.0})  # the same record of that model once more
    with pytest.raises(FileExistsError, match="left in place"):
        supersede(tmp_path, [again], "new")
    assert again.is_file() and json.loads((tmp_path / "superseded/points/p.old.json").read_text())["result"]["fid"] == 1.0


def test_pairs_are_per_training_seed_with_the_sampling_seed_mean():
    pts = [{"arm": arm, "train_seed": ts, "sample_seed": ss, "steps": 10, "spaces": [{"fid": v}]}
           for arm, ts, ss, v in [("a", 0, 0, 5.0), ("a", 0, 1, 7.0), ("a", 1, 0, 4.0), ("a", 1, 1, 4.0),
                                  ("b", 0, 0, 5.0), ("b", 0, 1, 5.0), ("b", 1, 0, 6.0), ("b", 1, 1, 6.0)]]
    c = evidence.cells(pts)
    assert c["a"][10] == {0: (6.0, 2), 1: (4.0, 2)}
    assert evidence.paired(c, "a", "b", 10, 10) == [(0, 1.0), (1, -2.0)]  # n = 2, not 4


def test_a_cell_of_one_training_seed_shows_no_spread():
    from pf.experiments.spaces import cell_text, seed_cell
    assert cell_text([]) == "pending"
    assert cell_text([11.6]) == "11.60 (n=1)"  # a std of one value is not a spread
    assert cell_text([4.0, 6.0]) == f"5.00 ± {math.sqrt(2.0):.2f} (n=2)"  # sample std
    # a cells() entry: each training seed's sampling-seed mean (3 and 2 points) is one value
    assert seed_cell({0: (4.0, 3), 1: (6.0, 2)}) == f"5.00 ± {math.sqrt(2.0):.2f} (n=2)"
    assert seed_cell({0: (0.5, 2)}, digits=1, scale=1000) == "500.0 (n=1)"
    assert seed_cell({}) == "pending"


@needs_fashion
def test_evidence_toy_end_to_end(tmp_path):
    argv = command.expand_toy(["toy=true", f"out_dir={tmp_path / 'out'}", f"records_dir={tmp_path / 'rec'}",
                               f"results={tmp_path / 'R.md'}", f"figures={tmp_path / 'fig'}", "device=cpu",
                               "arms=[pf_ltg_marginal,sit_uniform]", "late_arms=[]",
                               *[f"classifiers=[{ROOT / 'results/classifiers/fashion_mnist16_seed0.safetensors'},"
                                 f"{ROOT / 'results/classifiers/fashion_mnist16_seed1.safetensors'}]"]],
                              evidence.TOY)
    cfg = cli.parse(evidence.DEFAULTS, argv, free=evidence.FREE)
    evidence.main(cfg, argv=["toy=true"])
    s = command.study_config(cfg)
    data = evidence.collect(s)
    assert all(rec is not None for _, rec in data["stages"])
    assert all(rec["result"]["cpu_seconds"] > 0 for _, rec in data["stages"])
    fps = [evidence.classifier_fingerprint(p) for p in s["classifiers"]]
    assert len(data["points"]) == 2 * 2 * 2 * 2  # arms x training seeds x K x sampling seeds
    for p in data["points"]:
        assert [x["classifier"] for x in p["spaces"]] == fps and p["weights"] and p["fid"] == p["spaces"][0]["fid"]
    text = (tmp_path / "R.md").read_text()
    assert "n = 2 training seeds" in text and "Stages still pending" not in text
    assert f"from all {len(data['stages'])} of its stages (CPU time used" in text
    assert "what patch heterogeneity adds" not in text  # pf_ltg is not in this study
    assert "PF (one time per sample, LTG's marginal) against SiT (uniform t)" in text
    # SiT's own samplers at NFE 4 (Euler K = 4, Heun K = 2, the SDE M = 4), sampling seed 0, both
    # training seeds; Euler's points are the curve's, read back
    sp = data["sampler_points"]
    assert sorted((p["sampler"], p["steps"], p["train_seed"]) for p in sp) == [
        (n, k, ts) for n, k in (("euler", 4), ("heun", 2), ("sde", 4)) for ts in (0, 1)]
    assert all(p["nfe"] == 4 and p["sample_seed"] == 0 and p["arm"] == "sit_uniform" for p in sp)
    curve = {(p["train_seed"], p["steps"], p["sample_seed"]): p["fid"] for p in data["points"]
             if p["arm"] == "sit_uniform"}
    assert all(p["fid"] == curve[(p["train_seed"], 4, 0)] for p in sp if p["sampler"] == "euler")
    assert len({p["fid"] for p in sp}) > 2  # Heun and the SDE draw other images
    section = text[text.index("## SiT with its own samplers at NFE 4"):]
    section = section[:section.index("\n## ")]
    assert "| SiT (uniform t) | Heun | 2 | 4 | seed 0: " in section and "best sampler **" in section
    assert "PF (one time per sample, LTG's marginal) against SiT (uniform t) with " in section
    assert "n = 2 training seeds" in section
    # no stage starts once the CPU budget is spent: a new sampling seed's points are refused
    with pytest.raises(spaces.BudgetSpent):
        evidence.main(cli.parse(evidence.DEFAULTS, [*argv, "cpu_budget_hours=0.0", "eval.seeds=[0,1,2]"],
                                free=evidence.FREE), argv=["toy=true"])
    # curves in progress (their stage records not written yet) still report the points they stored
    for path in (tmp_path / "rec" / "stages").glob("*.json"):
        if json.loads(path.read_text())["name"].startswith(("curve ", "samplers ")):
            path.unlink()
    again = evidence.collect(s)
    for kind in ("points", "sampler_points"):
        assert sorted(map(config_key, again[kind])) == sorted(map(config_key, data[kind]))

    # a fresh clone on another machine: the run's kept weights are gone, the run is trained again
    # to another model (here: the kept weights perturbed) and measures the point it lacks on it
    run = evidence._trained_runs(s)[("sit_uniform", 0)]
    kept = kept_weights_path(s, run)
    ckpt = read_checkpoint_file(kept)
    first = next(iter(ckpt["ema"]))
    ckpt["ema"][first] = ckpt["ema"][first] + 0.01
    save_checkpoint(ckpt, kept)
    keys = {f: json.loads(f.read_text())["key"] for f in run_point_files(s["records_dir"], run["trajectory"], run["steps"])}
    assert len(keys) == 2 * 2 + 2  # the curve's K x sampling seeds, Heun and the SDE
    lost = [f for f, k in keys.items() if (k["sampler"], k["steps"], k["seed"]) == ("euler", 2, 0)]
    assert len(lost) == 1
    lost[0].unlink()
    with pytest.raises(ValueError, match=r"supersede=\[sit_uniform:0\]"):  # the report refuses two models in one run
        evidence.main(cfg, argv=["toy=true"])
    with pytest.raises(ValueError, match="is not arm:seed"):
        evidence.main(cli.parse(evidence.DEFAULTS, [*argv, "supersede=[sit_uniform:5]"], free=evidence.FREE))
    evidence.main(cli.parse(evidence.DEFAULTS, [*argv, "supersede=[sit_uniform:0]"], free=evidence.FREE),
                  argv=["toy=true", "supersede=[sit_uniform:0]"])
    moved = {p.name: p.parent.name for p in (tmp_path / "rec" / "superseded").rglob("*.json")}
    # the 5 points left of the earlier model (the curve's but the lost one; Heun and the SDE), and
    # the stage records that name it: the training's among them
    assert sorted(moved.values()).count("points") == 5
    assert any(json.loads(p.read_text())["name"] == "train sit_uniform seed 0"
               for p in (tmp_path / "rec" / "superseded" / "stages").glob("*.json"))
    final = evidence.collect(s)
    new_fp = final["train"][("sit_uniform", 0)]["kept_weights"]
    assert new_fp != data["train"][("sit_uniform", 0)]["kept_weights"]
    assert {p["weights"] for p in final["points"] + final["sampler_points"]
            if (p["arm"], p["train_seed"]) == ("sit_uniform", 0)} == {new_fp}
    assert len(final["points"]) == len(data["points"]) and len(final["superseded"]) == 5
    assert "Trained again where its kept weights were gone" in (tmp_path / "R.md").read_text()
    assert "supersede" not in (tmp_path / "R.md").read_text().split("```")[1]  # not in the command it names
    # the budget counts the CPU the study spent on the earlier model too
    spent = [json.loads(f.read_text())["result"]["cpu_seconds"] for f in (tmp_path / "rec").rglob("stages/*.json")]
    assert any("superseded" in str(f) for f in (tmp_path / "rec").rglob("stages/*.json"))
    assert spaces.cpu_spent(tmp_path / "rec") == pytest.approx(sum(spent))


def test_diagnostics_measure_the_kept_weights_and_drop_gone_runs(tmp_path):
    """The first study's kept weights (committed) sampled whole and cut at 0.9, in both committed
    feature spaces; a run whose weights are gone is listed, not retrained."""
    pytest.importorskip("torch_fidelity")
    from pf.experiments import diagnostics
    clfs = ",".join(str(ROOT / p) for p in evidence.DEFAULTS["classifiers"])
    argv = [f"points_dir={tmp_path / 'd'}", f"page={tmp_path / 'd.md'}", f"records_dir={ROOT / 'results/study'}",
            f"out_dir={tmp_path / 'out'}", "eval.num_samples=10", "eval.batch_size=10", "eval.compile=false",
            "eval.reference_size=100", "eval.kid_subsets=2", f"classifiers=[{clfs}]", "near.seeds=[0]",
            "near.steps=[3]", "adaptive.samplers=[]", "remeasure.arms=[pf_ltg]", "remeasure.seeds=[7]",
            "foreground.arms=[pf_ltg]", "foreground.seeds=[0]", "foreground.images=40", "foreground.times=[0.6]",
            "device=cpu"]
    diagnostics.main(cli.parse(diagnostics.DEFAULTS, argv, free=diagnostics.FREE), argv=[])
    s = command.study_config(cli.parse(diagnostics.DEFAULTS, argv, free=diagnostics.FREE))
    data = diagnostics.collect(s)
    near = [p for p in data["points"] if p["stage"] == "near"]
    assert sorted((p["arm"], p["nfe"]) for p in near) == [("pf_ltg", 3), ("pf_ltg", 4), ("sit_uniform", 3),
                                                         ("sit_uniform", 4)]  # whole: K; cut: ceil(0.9 K) + 1
    assert all(len(p["spaces"]) == 2 and p["weights"] for p in near)
    assert data["gone"] == ["pf_ltg seed 7"] and not (tmp_path / "out").exists()  # nothing retrained
    assert "Dropped (kept weights gone" in (tmp_path / "d.md").read_text()
    (fg,) = data["foreground"]  # Fashion-MNIST has background patches; the certain ones are mostly those
    assert 0.3 < fg["foreground_share"] < 0.9 and fg["times"][0]["certain_background_share"] > 0.3
    assert fg["times"][0]["spearman_all"] > fg["times"][0]["spearman_foreground"]


def test_diagnostics_count_training_seeds_not_sampling_seeds():
    from pf.experiments import diagnostics
    pts = [{"arm": arm, "train_seed": ts, "sample_seed": ss, "steps": 10, "spaces": [{"fid": v}, {"fid": v + 1}]}
           for arm, ts, ss, v in [("pf_ltg", 0, 0, 10.0), ("pf_ltg", 0, 1, 12.0), ("pf_ltg", 1, 0, 14.0),
                                  ("pf_ltg", 1, 1, 14.0), ("sit_uniform", 0, 0, 11.0), ("sit_uniform", 0, 1, 11.0),
                                  ("sit_uniform", 1, 0, 12.0), ("sit_uniform", 1, 1, 12.0), ("sit_uniform", 2, 0, 9.0)]]
    rc = {"steps": [10], "arms": ["pf_ltg", "sit_uniform"], "sample_seeds": [0, 1]}
    text = "\n".join(diagnostics.remeasure_lines(rc, pts, 2, {"pf_ltg": "PF", "sit_uniform": "SiT"}))
    # seed means 11 and 14 (not the 4 points' std): 12.5 ± std(11, 14) over n = 2 training seeds
    assert f"| PF | 12.50 ± {math.sqrt(4.5):.2f} (n=2) | 13.50 ± {math.sqrt(4.5):.2f} (n=2) |" in text
    assert f"| SiT | 10.67 ± {math.sqrt(7 / 3):.2f} (n=3) |" in text
    # PF minus SiT per training seed: 11 - 11 and 14 - 12; seed 2 has no PF run
    assert "Feature space 1: PF minus SiT (negative: PF better), per training seed: K = 10: +1.00 ± 1.41 " \
           "(n = 2 training seeds: +0.00, +2.00)." in text
    assert diagnostics.remeasure_lines(rc, [], 2, {}) == []


def test_a_device_call_can_run_the_study():
    """scripts/gpu_study.sh runs any module naming its stages (PF_STUDY_MODULE): the plan of this one."""
    from pf.experiments import device_call
    p = device_call.plan("pf.experiments.evidence", ["device=cuda", "records_dir=/nonexistent-records"], 540)
    assert p["jobs"] == 8 and p["left"][0] == "floor" and "train pf_ltg seed 2" in p["left"] and not p["done"]
    assert "samplers sit_uniform seed 2" in p["left"]  # SiT's own samplers run in the same call


def test_the_cut_grid_is_eulers_grid_to_the_cut_then_one_step():
    g = spaces.cut_grid(100, 0.9)
    assert len(g) == 92 and g[-2:] == [0.9, 1.0] and g[0] == 0.0
    assert all(abs((b - a) - 0.01) < 1e-12 for a, b in zip(g[:-2], g[1:-1]))  # K = 100's step up to 0.9
    g = spaces.cut_grid(25, 0.9)
    assert len(g) - 1 == 24 and max(b - a for a, b in zip(g[:-2], g[1:-1])) <= 1 / 25  # ceil(22.5) = 23 steps


def test_every_committed_stage_record_is_found_under_the_module_names():
    """The records ``python -m`` wrote (functions ``__main__:...``) still count for the stages
    now named by module: renaming re-runs no finished stage of either study."""
    from pf.experiments import diagnostics
    from pf.experiments.stages import stage_result
    for module, records in ((evidence, "records_dir"), (diagnostics, "points_dir")):
        s = command.study_config(cli.parse(module.DEFAULTS, [], free=module.FREE))
        stages = {x.name: x for x in module.build_stages(s)}
        files = sorted((ROOT / s[records] / "stages").glob("*.json"))
        assert files, module.__name__
        for f in files:
            rec = json.loads(f.read_text())
            assert stage_result(ROOT / s[records], stages[rec["name"]]) == rec, (module.__name__, rec["name"])


def test_the_committed_reports_opening_is_five_lines_that_name_n():
    s = command.study_config(cli.parse(evidence.DEFAULTS, [], free=evidence.FREE))
    data = evidence.collect(s)
    lines = evidence.conclusion_lines(s, data)
    assert 1 <= len(lines) <= 3 and lines[0].startswith("- This comparison")
    assert all("n = " in line for line in lines[1:]) and ("n = " in lines[0]) == bool(evidence.paired(
        evidence.cells(data["points"], 0), "pf_ltg", "sit_uniform", 100, 100))
    opening = (ROOT / "RESULTS.md").read_text().split("\n\nGenerated by")[0]
    assert 1 <= sum(line.startswith("- ") for line in opening.splitlines()) <= 5
    # every SiT arm is named against PF (LTG) in the committed first line with its best sampler
    # and the per-seed differences, both worked out here from the raw points
    ec, labels = s["eval"], evidence.arm_labels(s)
    nfe, sseeds = int(ec["sit_sampler_nfe"]), {int(x) for x in ec["sit_sampler_seeds"]}

    def fid(pts, arm, seed, **match):  # mean over the sampling seeds of one training seed
        v = [p["fid"] for p in pts if p["arm"] == arm and p["train_seed"] == seed and p["sample_seed"] in sseeds
             and all(p[k] == x for k, x in match.items())]
        return sum(v) / len(v) if v else None

    first = next(line for line in opening.splitlines() if line.startswith("- "))
    seeds = [int(x) for x in s["train"]["seeds"]]  # the committed study is complete: every seed has every sampler
    for sit in evidence.sit_arms(s):
        by = {b: [fid(data["sampler_points"], sit, t, sampler=b, target_nfe=nfe) for t in seeds]
              for b in ec["sit_samplers"]}
        b = min(by, key=lambda n: sum(by[n]))
        per_seed = [fid(data["points"], "pf_ltg", t, steps=nfe) - f for t, f in zip(seeds, by[b])]
        assert (f"minus {labels[sit]} with its best sampler ({evidence.SAMPLER_LABELS[b]}, NFE {nfe})" in first
                and ", ".join(f"{d:+.2f}" for d in per_seed) in first), (sit, b, per_seed)


def test_every_committed_point_was_measured_on_its_runs_recorded_weights():
    s = command.study_config(cli.parse(evidence.DEFAULTS, [], free=evidence.FREE))
    data = evidence.collect(s)
    points = data["points"] + data["sampler_points"]
    assert points and all(p["weights"] for p in points)
    evidence.check_one_realization(points, data["train"])


def test_adaptive_summary_puts_the_selection_rules_side_by_side():
    from pf.experiments.diagnostics import adaptive_cells
    pts = [{"sampler": "look_ahead", "nfe": 25, "protocol": "matched NFE 25", "steps": 13, "rule": r, "fid": f}
           for r, f in (("random", 12.8), ("uncertainty", 13.88))]
    pts.append({"sampler": "dual_loop", "nfe": 400, "protocol": "paper's protocol", "steps": 100, "rule": "uncertainty",
                "fid": 15.571})
    assert adaptive_cells(pts, ["uncertainty", "random"]) == [
        "dual_loop paper's protocol (K = 100, NFE 400) 15.57 / -",
        "look_ahead matched NFE 25 (K = 13, NFE 25) 13.88 / 12.80"]
