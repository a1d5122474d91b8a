"""First contact: every command fails in one clear line. Each bad input goes through the real
command line (a child process) and must print exactly one ``error: ...`` line naming the
problem, exit with code 2, and show no traceback (PF_DEBUG=1 brings the traceback back).
Also: every shipped config option fits the typed schema, and the schema's checks one by one."""

from __future__ import annotations

import itertools
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from child_env import ROOT, child_env
from pf.training.schema import ConfigError, check_config, check_overrides, group_options

CONFIG_DIR = Path(ROOT) / "pf" / "configs"


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=child_env(OMP_NUM_THREADS="1", **env),
                          capture_output=True, text=True, timeout=300)


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
    (["-m", "pf.sample", "ckpt=x.pt", "steps=abc"], r"steps must be a positive integer"),
    (["-m", "pf.eval", "generated=/nonexistent"], r"generated=/nonexistent: no such file or folder"),
    (["-m", "pf.eval", "generated=x", "num_samples=abc"], r"num_samples='abc': expected an integer"),
    (["-m", "pf.export", "/nonexistent.pt"], r"checkpoint not found: /nonexistent\.pt"),
    (["-m", "pf.eval.train_classifier", "data.name=fashion_mnist", "data.path=/nope"], r"/nope: no train images file"),
    (["-m", "pf.experiments.reproduce", "train.steps=abc"], r"train\.steps='abc': expected an integer"),
    (["-m", "pf.experiments.findings", "bogus=1"], r"unknown option 'bogus'"),
    (["-m", "pf.data.encode", "images=/nonexistent", "out=/tmp/pf-cli-errors-lat", "vae=/nope"],
     r"images=/nonexistent: no such folder"),
    (["-m", "pf.data.encode", "images=/tmp", "out=/tmp/pf-cli-errors-lat"], r"set vae=<local diffusers AutoencoderKL"),
]


def test_every_bad_input_is_one_error_line():
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda case: _run(case[0]), CASES))
    for (args, pattern), proc in zip(CASES, procs):
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, (args, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, lines)
        import re

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
    ("trainer.precision=fp16", r"trainer\.precision='fp16': expected one of bf16, fp32"),
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
