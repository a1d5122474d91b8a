"""First contact: every command fails in one clear line. Each bad input goes through the real
command line (a child process) and must print exactly one ``error: ...`` line naming the
problem, exit with code 2, and show no traceback (PF_DEBUG=1 brings the traceback back).
Also: every shipped config option fits the typed schema, and the schema's checks one by one."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from child_env import ROOT, child_env
from mounts import read_only_folder, unmount
from pf.training.schema import ConfigError, check_config, check_overrides, group_options

CONFIG_DIR = Path(ROOT) / "pf" / "configs"


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=child_env(OMP_NUM_THREADS="1", **env),
                          capture_output=True, text=True, timeout=300)


# Every case is still its own process running ``python -m <command> ARGS`` (runpy, as ``-m``
# does) with its own stderr and exit code, but forked from one launcher that imported torch
# and pf's libraries once: 26 fresh interpreters spent about 100 s of CPU importing them.
# The command modules themselves are not preloaded: each case imports and runs its own.
# test_debug_switch_shows_the_traceback goes through a real ``python -m``.
LAUNCHER = r"""
import json, os, runpy, sys, traceback
import hydra, omegaconf, torch, pf_kernels, pf.models  # the shared, slow imports

def run(module, args, err_path):
    os.dup2(os.open(err_path[:-4] + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:  # what the interpreter does with an uncaught SystemExit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else (print(e.code, file=sys.stderr) or 1))
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

cases, out_dir = json.loads(sys.argv[1]), sys.argv[2]
running, codes = {}, {}
for i, (module, args) in enumerate(cases):
    if len(running) == 2:  # two at a time, one per core
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    pid = os.fork()
    if pid == 0:
        run(module, args, os.path.join(out_dir, f"{i}.err"))
    running[pid] = i
while running:
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps([codes[i] for i in range(len(cases))]))
"""


def _run_forked(cases: list[list[str]], tmp_path: Path) -> list[tuple[int, str]]:
    """(exit code, stderr) of ``python -m MODULE ARGS`` for each ``["-m", MODULE, *ARGS]``."""
    modules = [(args[1], args[2:]) for args in cases]
    assert all(args[0] == "-m" for args in cases)
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(modules), str(tmp_path)], cwd=ROOT,
                          env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.splitlines()[-1])
    return [(code, (tmp_path / f"{i}.err").read_text()) for i, code in enumerate(codes)]


TRAIN = ["-m", "pf.train", "trainer.max_steps=1", "hydra.run.dir=/tmp/pf-cli-errors-run"]
CASES = [
    # pf.train: one case per key type of the schema, bad data, unknown options and keys
    (TRAIN + ["trainer.lr=abc"], r"trainer\.lr='abc': expected a number > 0"),
    (TRAIN + ["trainer.lr=-1"], r"trainer\.lr=-1: expected a number > 0"),
    (TRAIN + ["trainer.batch_size=0"], r"trainer\.batch_size=0: expected an integer >= 1"),
    (TRAIN + ["trainer.batch_size=2.5"], r"trainer\.batch_size=2\.5: expected an integer"),
    (TRAIN + ["trainer.ema_warmup=maybe"], r"trainer\.ema_warmup='maybe': expected true or false"),
    (TRAIN + ["device=tpu"], r"device='tpu': expected one of auto, cpu, cuda"),
    (TRAIN + ["trainer.betas=[0.9]"], r"trainer\.betas=\[0\.9\]: expected a list of numbers .* of length 2"),
    (TRAIN + ["data.num_classes=ten"], r"data\.num_classes='ten': expected an integer >= 1 or null"),
    (TRAIN + ["model.class_dropout_prob=1.5"], r"model\.class_dropout_prob=1\.5: expected a number in \[0\.0, 1\.0\)"),
    (TRAIN + ["sampler=look_ahead", "sampler.params.p=1.5"], r"sampler\.params=.*p .* must lie in \(0, 1\), got 1\.5"),
    (TRAIN + ["trainer.timesteps.name=ltgg"], r"trainer\.timesteps\.name='ltgg': expected one of .*ltg"),
    (TRAIN + ["model=pf-q"], r"model=pf-q: unknown option; choose one of pf-b2, .*tiny"),
    (TRAIN + ["trainer.bogus=1"], r"unknown config key trainer\.bogus \(trainer takes: kind, "),
    (TRAIN + ["data=folder", "data.path=/nonexistent"], r"data\.path /nonexistent is not a directory"),
    (TRAIN + ["data=fashion_mnist", "data.path=/nonexistent"], r"apt-get install dataset-fashion-mnist.*data\.path="),
    (TRAIN + ["resume=/nonexistent/run"], r"resume=/nonexistent/run: no such checkpoint file or run directory"),
    # the other commands
    (["-m", "pf.sample", "ckpt=/nonexistent.pt"], r"checkpoint not found: /nonexistent\.pt"),
    (["-m", "pf.sample", "ckpt=x.pt", "steps=abc"], r"steps='abc': expected an integer"),
    (["-m", "pf.eval", "generated=/nonexistent"], r"generated=/nonexistent: no such file or folder"),
    (["-m", "pf.eval", "generated=x", "num_samples=abc"], r"num_samples='abc': expected an integer"),
    (["-m", "pf.export", "/nonexistent.pt"], r"checkpoint not found: /nonexistent\.pt"),
    (["-m", "pf.eval.train_classifier", "data.name=fashion_mnist", "data.path=/nope"], r"/nope: no train images file"),
    (["-m", "pf.experiments.reproduce", "train.steps=abc"], r"train\.steps='abc': expected an integer"),
    (["-m", "pf.experiments.findings", "bogus=1"], r"unknown option 'bogus'"),
    (["-m", "pf.data.encode", "images=/nonexistent", "out=/tmp/pf-cli-errors-lat", "vae=/nope"],
     r"images=/nonexistent: no such folder"),
    (["-m", "pf.data.encode", "images=/tmp", "out=/tmp/pf-cli-errors-lat"], r"set vae=<local diffusers AutoencoderKL"),
    # issue 27, finding 7 through the real entry points: hydra's own parse error, a study's compose
    (TRAIN + ["trainer.lr=[1,"], r"trainer\.lr=\[1,: .*no viable alternative"),
    (["-m", "pf.experiments.reproduce", "data=nope"], r"data=nope: unknown option; choose one of .*digits"),
    *([(TRAIN + ["device=cuda"], r"device=cuda but no CUDA device is available")] if not torch.cuda.is_available()
      else []),
    # a loss that blows up at step 2 under `python -m pf.train`: the class the script raises is the one caught
    (["-m", "pf.train", "trainer.max_steps=3", "trainer.lr=1e30", "trainer.grad_clip=1e30", "trainer.progress=false",
      "data.val_size=0", "hydra.run.dir={tmp}/non-finite"], r"non-finite loss \(loss=.*\) at step 2; stopped before "
                                                               r"the update, no checkpoint was written yet"),
]


def test_every_bad_input_is_one_error_line(tmp_path):
    results = _run_forked([[a.replace("{tmp}", str(tmp_path)) for a in args] for args, _ in CASES], tmp_path)
    for (args, pattern), (code, stderr) in zip(CASES, results):
        lines = [ln for ln in stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
        assert code == 2, (args, code, stderr[-2000:])
        assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr, (args, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, lines)
        assert re.search(pattern, lines[0]), (args, lines[0])


def test_debug_switch_shows_the_traceback():
    proc = _run(TRAIN + ["trainer.lr=abc"], PF_DEBUG="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_every_shipped_option_fits_the_schema():
    for trainer, sampler, data in itertools.product(group_options("trainer"), group_options("sampler"),
                                                    group_options("data")):
        check_config(_compose(f"trainer={trainer}", f"sampler={sampler}", f"data={data}"))
    for model in group_options("model"):
        check_config(_compose(f"model={model}"))


@pytest.mark.parametrize("override,message", [
    ("trainer.ema_decay=1.0", r"trainer\.ema_decay=1\.0: expected a number in \[0\.0, 1\.0\)"),
    ("trainer.warmup_steps=-1", r"expected an integer >= 0"),
    ("sampler.map_time=2", r"sampler\.map_time=2: expected a number in \[0\.0, 1\.0\]"),
    ("sampler.classes=[1,-2]", r"sampler\.classes=\[1, -2\]: expected a list of integers >= 0"),
    ("trainer.precision=fp8", r"trainer\.precision='fp8': expected one of bf16, fp16, fp32"),
    ("data.split=val", r"data\.split='val': expected one of train, test"),
    ("trainer.timesteps.std=0", r"trainer\.timesteps\.std=0: expected a number > 0"),
    ("seed=-3", r"seed=-3: expected an integer >= 0"),
])
def test_schema_checks(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(_compose(override))


def test_command_line_keys_are_checked_before_composing():
    check_overrides(["trainer.lr=1", "sampler.params.p=0.3", "+hydra.job.name=x", "data=fashion_mnist"])
    with pytest.raises(ConfigError, match=r"unknown config key lr \(the config takes: data, model, trainer"):
        check_overrides(["lr=1"])
    with pytest.raises(ConfigError, match=r"trainer\.lr is not a group of keys"):
        check_overrides(["trainer.lr.x=1"])
    with pytest.raises(ConfigError, match=r"data=imagenet: unknown option"):
        check_overrides(["data=imagenet"])


# ---------------------------------------------------------------------------------------------
# The error contract of every entry point, called in-process (its main with this argv, stderr
# captured): exactly one ``error:`` line and exit code 2 for each bad input, and with PF_DEBUG=1
# the exception itself (its traceback). Issue 27, finding 7's list is here, each by its entry point.

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    import numpy as np
    import torch
    from PIL import Image

    from model_helpers import tiny_model
    from pf.models.checkpoint import model_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("bad")
    ckpt = root / "tiny.pt"
    save_checkpoint(model_checkpoint(tiny_model(dtype=torch.float32)), ckpt)
    unknown = model_checkpoint(tiny_model(dtype=torch.float32))
    unknown["config"]["bogus_param"] = 3  # a config from another version
    save_checkpoint(unknown, root / "unknown_param.pt")
    save_checkpoint({"format": "patch-forcing", "model_class": "PatchForcingT2I", "config": {}, "state_dict": {}},
                    root / "t2i.pt")
    (root / "random.pt").write_bytes(bytes(range(256)) * 8)
    (root / "empty.pt").write_bytes(b"")
    (root / "prompts.bin").write_bytes(bytes(range(256)) * 4)
    (root / "a_file").write_text("not a folder")
    pictures = root / "pictures"
    pictures.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(pictures / f"{i}.png")
    (pictures / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    (root / "classes" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "classes" / "a" / "0.png")
    ro = read_only_folder(root / "read-only")
    yield {"root": root, "ckpt": ckpt, "ro": ro}
    if ro is not None:
        unmount(ro)


def _entry(name: str):
    """The callable behind ``python -m NAME``: argv -> exit code."""
    import importlib

    from pf import cli
    from pf.errors import run_command

    if name in ("pf.sample", "pf.export", "pf.experiments.device_call"):
        return importlib.import_module(name).main
    if name == "pf.train":  # hydra's app itself runs in a child (CASES above); its command-line checks here
        import pf.train

        return lambda argv: run_command(lambda: pf.train._check_command_line(argv))
    module = importlib.import_module("pf.eval.__main__" if name == "pf.eval" else name)
    if name.startswith("pf.experiments."):
        from pf.experiments.command import expand_toy

        return lambda argv: cli.run(module.main, module.DEFAULTS, module.__doc__, free=getattr(module, "FREE", ()),
                                    argv=expand_toy(argv, list(module.TOY)))
    free = ("sampler.params",) if name == "pf.eval" else ()
    return lambda argv: cli.run(module.main, module.DEFAULTS, module.__doc__, free=free, argv=argv)


NO_GPU = "no CUDA device is available"
RO = r"(read-only|Read-only file system|cannot write here)"
# (entry point, argv with {root}/{ckpt}/{ro} filled in, the line's pattern); {ro} cases need a read-only folder
CONTRACT = [
    # pf.train: hydra's own parse error, a run folder that cannot be written or is a file
    ("pf.train", ["trainer.lr=[1,"], r"trainer.lr=\[1,: .*no viable alternative"),
    ("pf.train", ["hydra.run.dir={root}/a_file"], r"a_file: not a folder"),
    ("pf.train", ["hydra.run.dir={ro}/run"], RO),
    # pf.sample
    ("pf.sample", ["ckpt={ckpt}", "out={ro}/samples"], RO),
    ("pf.sample", ["ckpt={ckpt}", "out={root}/a_file"], r"a_file: not a folder"),
    ("pf.sample", ["ckpt={ckpt}", "out={root}/s", "device=cuda"], NO_GPU),
    ("pf.sample", ["ckpt={ckpt}", "out={root}/s", "prompts={root}/prompts.bin"],
     r"prompts=.* is not a UTF-8 text file"),
    ("pf.sample", ["ckpt={root}/unknown_param.pt", "out={root}/s"], r"unknown_param.pt: its config does not fit "
                                                                    r"PatchForcingDiT .*bogus_param"),
    ("pf.sample", ["ckpt={root}/random.pt", "out={root}/s"], r"random.pt is not a readable checkpoint"),
    ("pf.sample", ["ckpt={root}/empty.pt", "out={root}/s"], r"empty.pt is empty \(0 bytes\), not a checkpoint$"),
    ("pf.sample", ["ckpt={ckpt}", "out={root}/s", "cfg=.inf"], r"cfg must be a finite number, got inf"),
    ("pf.sample", ["ckpt={ckpt}", "out={root}/s", "steps=True"], r"steps=True: expected an integer"),
    ("pf.sample", ["ckpt={ckpt}", "out={root}/s", "n=-5"], r"n must be a positive integer, got -5"),
    # pf.export
    ("pf.export", ["{ckpt}", "--out", "{root}"], r"--out .* is a folder: name the file to write"),
    ("pf.export", ["{ckpt}", "--out", "{ckpt}"], r"--out .* is the checkpoint being exported"),
    ("pf.export", ["{ckpt}", "--out", "{ro}/x.pt"], RO),
    ("pf.export", ["{root}/random.pt"], r"random.pt is not a readable checkpoint"),
    ("pf.export", ["{ckpt}", "--format", "onnx"], r"argument --format: invalid choice: 'onnx'.*--help lists"),
    ("pf.export", [], r"the following arguments are required: checkpoint"),
    # pf.eval
    ("pf.eval", ["generated={root}/t2i.pt"], r"is a text-to-image checkpoint: pf.eval draws class-conditional"),
    ("pf.eval", ["generated={root}/pictures"], r"3.png is not a readable image"),
    ("pf.eval", ["generated={ckpt}", "num_samples=-5"], r"num_samples=-5: expected an integer >= 1"),
    ("pf.eval", ["generated={ckpt}", "device=cuda"], NO_GPU),
    ("pf.eval", ["generated={root}/pictures", "out={ro}/eval.json"], RO),
    ("pf.eval", ["generated={root}/pictures", "out={root}"], r"out=.* is a folder: name the JSON file"),
    # pf.eval.train_classifier: refused before any training
    ("pf.eval.train_classifier", ["out={ro}/c.pt"], RO),
    ("pf.eval.train_classifier", ["out={root}"], r"out=.* is a folder: name the classifier file"),
    ("pf.eval.train_classifier", ["out={root}/c.pt", "test_frac=1.5"], r"test_frac=1.5: expected a number in \[0, 1\)"),
    ("pf.eval.train_classifier", ["out={root}/c.pt", "epochs=0"], r"epochs=0: expected an integer >= 1"),
    # pf.data.encode
    ("pf.data.encode", ["images={root}/classes", "out={root}/a_file", "vae=/nope"], r"out=.*a_file is a file"),
    ("pf.data.encode", ["images={root}/classes", "out={ro}/latents", "vae=/nope"], RO),
    ("pf.data.encode", ["images={root}/classes", "out={root}/lat", "vae=/nope", "device=cuda"], NO_GPU),
    ("pf.data.encode", ["images={root}/classes", "out={root}/lat", "vae=/nope", "dtype=int8"], r"dtype must be"),
    # the studies
    ("pf.experiments.reproduce", ["data=nope"], r"data=nope: unknown option; choose one of .*digits"),
    ("pf.experiments.reproduce", ["train.steps=abc"], r"train\.steps='abc': expected an integer"),
    ("pf.experiments.findings", ["bogus=1"], r"unknown option 'bogus'"),
    ("pf.experiments.repa", ["bogus"], r"expected key=value, got 'bogus'"),
    ("pf.experiments.t2i", ["train.steps=[1"], r"train\.steps"),
    ("pf.experiments.device_call", ["plan"], r"the following arguments are required: study"),
    ("pf.experiments.device_call", ["snapshot", "a", "b", "c"], r"unexpected arguments: \['c'\]"),
]


def _fill(args: list[str], files: dict) -> list[str]:
    return [a.format(root=files["root"], ckpt=files["ckpt"], ro=files["ro"]) for a in args]


def test_every_entry_point_keeps_the_error_contract(bad_files, capsys, monkeypatch):
    monkeypatch.delenv("PF_DEBUG", raising=False)
    ran = set()
    for name, args, pattern in CONTRACT:
        if ("{ro}" in " ".join(args) and bad_files["ro"] is None) or (pattern == NO_GPU and torch.cuda.is_available()):
            continue
        argv = _fill(args, bad_files)
        code = _entry(name)(argv)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, argv, code, err[-1500:])
        assert re.search(pattern, lines[0]), (name, argv, lines[0])
        ran.add(name)
    assert ran >= {"pf.train", "pf.sample", "pf.export", "pf.eval", "pf.eval.train_classifier", "pf.data.encode",
                   "pf.experiments.reproduce", "pf.experiments.findings", "pf.experiments.repa", "pf.experiments.t2i",
                   "pf.experiments.device_call"}
    assert not (bad_files["root"] / "c.pt").exists()  # nothing trained for a refused classifier

    # PF_DEBUG=1: the same inputs raise, so the interpreter prints their traceback
    monkeypatch.setenv("PF_DEBUG", "1")
    for name, args, _ in CONTRACT[::4]:
        if "{ro}" in " ".join(args) and bad_files["ro"] is None:
            continue
        with pytest.raises(Exception):
            _entry(name)(_fill(args, bad_files))
    capsys.readouterr()
