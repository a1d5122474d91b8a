"""A study's command: ``toy=true`` expanded to the toy sizes, the plain study dict its stages
receive, and the body every study command shares (run or continue the stages, rewriting the
report as they finish; ``report_only=true`` only rewrites it)."""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable

from omegaconf import OmegaConf

from pf import cli
from pf.experiments.stages import Stage, run_stages

COMMAND_ONLY = ("report_only", "toy")  # settings of the command, not of the study


def expand_toy(argv: list[str], toy: list[str]) -> list[str]:
    """``toy=true`` stands for the ``toy`` sizes (explicit arguments still win)."""
    return [*toy, *argv] if any(a.lstrip("+") in ("toy=true", "toy=True") for a in argv) else argv


def study_config(cfg) -> dict:
    """The plain study dict the stages receive (without the command's own settings)."""
    study = OmegaConf.to_container(cfg, resolve=True)
    for key in COMMAND_ONLY:
        study.pop(key, None)
    return study


def run_study(cfg, argv: list[str] | None, build: Callable[[dict], list[Stage]],
              report: Callable[[dict, str], None], doc_command: str, output: str,
              records: str = "records_dir") -> None:
    """Run (or continue) the stages ``build(study)`` lists, then write the report
    (``report(study, command)``, also after each stage); ``output``: the setting naming the
    report file, ``records``: the one naming the folder of the stage records. The report names
    the command that regenerates it."""
    t0 = time.perf_counter()
    study = study_config(cfg)
    # the report names the command that regenerates it: without one-off actions
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith(("report_only", "supersede"))]
    command = " ".join([doc_command, *map(shlex.quote, args)])
    if not cfg.get("report_only", False):
        run_stages(build(study), study[records], jobs=int(study.get("jobs", 1)), threads=int(study["threads"]),
                   on_finish=lambda *_: report(study, command))
    report(study, command)
    print(f"wrote {study[output]} in {(time.perf_counter() - t0) / 60:.1f} min")


def main(run: Callable, defaults: dict, doc: str, free: tuple[str, ...] = (), toy: list[str] = ()) -> int:
    """A study's ``python -m`` entry: the command line (``toy=true`` expanded) parsed and run."""
    # Waiting OpenMP threads that spin slow every torch op on a shared CPU; this reaches the
    # worker processes (spawned after it), which import torch afresh.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return cli.run(run, defaults, doc, free=free, argv=expand_toy(sys.argv[1:], list(toy)))
