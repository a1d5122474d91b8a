"""A study advanced as far as one device call allows, and its new records carried home.

A lent GPU is reached by one command of at most 10 minutes on a bare machine, and only files
written under ``$OUT`` come back (8 files, 16 MiB each). ``scripts/gpu_study.sh`` runs these
steps in that one command, and merges what came back here:

    python -m pf.experiments.device_call plan STUDY [OVERRIDES]      stages done and left, jobs, budget
    python -m pf.experiments.device_call snapshot RECORDS FILE       what RECORDS holds before the run
    python -m pf.experiments.device_call run STUDY --deadline T --summary FILE [OVERRIDES]
    python -m pf.experiments.device_call pack RECORDS SNAPSHOT OUT --summary FILE
    python -m pf.experiments.device_call unpack RECORDS TAR...       merge returned tars into RECORDS

STUDY is a study module (``pf.experiments.reproduce``, or a later study version) that names its
stages and nothing more: ``DEFAULTS``, ``FREE``, ``TOY`` and ``build_stages(study)``.

What a cut leaves: the run stops starting stages at the deadline and interrupts the running
ones (:func:`pf.experiments.stages.run_stages`); stage records and points are written whole or
not at all, so the returned records are all complete. A training run cut midway is retrained
from its start in the next call: its checkpoint (weights, EMA and optimizer state, about 8x
the kept float16 weights) lives in ``out_dir``, which does not come back. A finished training
run comes back as its kept weights in ``records_dir/weights``, so the next call (or this CPU)
evaluates it without retraining.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import torch

from pf import cli
from pf.errors import run_command
from pf.experiments import command
from pf.experiments.records import write_json
from pf.experiments.stages import run_stages, stage_result
from pf.models.checkpoint import write_atomically

# What comes back from a call: at most 8 files of 16 MiB; the log and the summary take two.
MAX_TARS = 6
TAR_BYTES = 15 * 2**20
# Settings a device call adds unless the command line gives them: sampling a model of this
# size is a fraction of a second a point on a GPU, so torch.compile's start-up (tens of seconds
# per model and process) would cost more than it saves.
DEVICE_DEFAULTS = ["eval.compile=false"]
# GPU memory a worker process needs, by model preset (GiB): the CUDA context (about 0.5),
# PyTorch's cached blocks, the model, its optimizer and an evaluation batch of 500 images.
WORKER_GIB = {"tiny": 2.0}
WORKER_GIB_OTHER = 8.0
MAX_JOBS = 8  # more processes than this only queue on the GPU's one stream per process


#################################################################################
#                                 The study                                     #
#################################################################################


def load_study(module_name: str, overrides: list[str], device_defaults: bool) -> tuple[object, dict]:
    """The study module and its plain study dict for these command-line overrides."""
    module = importlib.import_module(module_name)
    for name in ("DEFAULTS", "FREE", "TOY", "build_stages"):
        if not hasattr(module, name):
            raise SystemExit(f"device_call: {module_name} does not name its stages ({name} missing)")
    given = {a.lstrip("+").split("=", 1)[0] for a in overrides}
    extra = [d for d in DEVICE_DEFAULTS if d.split("=", 1)[0] not in given and has_key(module.DEFAULTS, d)]
    extra = extra if device_defaults else []
    argv = command.expand_toy([*extra, *overrides], list(module.TOY))
    return module, command.study_config(cli.parse(module.DEFAULTS, argv, tuple(module.FREE)))


def has_key(defaults: dict, override: str) -> bool:
    node = defaults
    for part in override.split("=", 1)[0].split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def choose_jobs(model: str, gpu_gib: float | None, cpus: int) -> tuple[int, int]:
    """Worker processes and torch threads each for one GPU: as many workers as the GPU memory
    holds at :data:`WORKER_GIB` each (80% of it), at most one per two CPU cores (each worker
    also runs its data loading and metrics on the CPU) and at most :data:`MAX_JOBS`."""
    per = WORKER_GIB.get(model, WORKER_GIB_OTHER)
    by_memory = int(0.8 * gpu_gib // per) if gpu_gib else 1
    jobs = max(1, min(by_memory, cpus // 2, MAX_JOBS))
    return jobs, max(1, cpus // jobs)


def gpu_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


# The lent machine (an H100: 80 GiB, 16 cores), for a plan printed where no GPU is visible.
LENT_GPU = (80.0, 16)


def resolved_jobs(study: dict, overrides: list[str]) -> tuple[int, int, str]:
    """(jobs, threads, why): the command line's when it gives them, else :func:`choose_jobs`
    on a CUDA study (for the lent machine, :data:`LENT_GPU`, where no GPU is visible: a plan)."""
    given = {a.split("=", 1)[0] for a in overrides}
    if "jobs" in given or study.get("device") != "cuda":
        return int(study["jobs"]), int(study["threads"]), "as given"
    mem, cpus, where = gpu_gib(), os.cpu_count() or 1, ""
    if mem is None:
        (mem, cpus), where = LENT_GPU, "no GPU here; on the lent machine: "
    jobs, threads = choose_jobs(study["model"], mem, cpus)
    per = WORKER_GIB.get(study["model"], WORKER_GIB_OTHER)
    why = f"{where}{mem:.0f} GiB GPU at {per:g} GiB a worker, {cpus} cores at 2 a worker, at most {MAX_JOBS}"
    return jobs, (threads if "threads" not in given else int(study["threads"])), why


def plan(module_name: str, overrides: list[str], budget_s: float) -> dict:
    """The stages done and left, and how the call would run them (nothing runs)."""
    module, study = load_study(module_name, overrides, device_defaults=True)
    stages = module.build_stages(study)
    done = [s.name for s in stages if stage_result(study["records_dir"], s) is not None]
    jobs, threads, why = resolved_jobs(study, overrides)
    return {"study": module_name, "device": study["device"], "records_dir": study["records_dir"],
            "out_dir": study["out_dir"], "jobs": jobs, "threads": threads, "jobs_why": why, "budget_s": budget_s,
            "stages": len(stages), "done": done, "left": [s.name for s in stages if s.name not in done]}


def print_plan(p: dict) -> None:
    print(f"study {p['study']}: device={p['device']} jobs={p['jobs']} ({p['jobs_why']}) threads={p['threads']} "
          f"budget {p['budget_s']:.0f} s; records {p['records_dir']}, runs {p['out_dir']}")
    print(f"{len(p['done'])} of {p['stages']} stages done; left, in the order they start when ready:")
    for name in p["left"]:
        print(f"  {name}")


def run(module_name: str, overrides: list[str], deadline: float, summary: Path) -> int:
    """Run the study's unfinished stages until ``deadline``; the summary of what was done and
    what is left is written whatever happens (0: every stage done, 1: some left, 2: a stage failed)."""
    t0 = time.time()
    module, study = load_study(module_name, overrides, device_defaults=True)
    stages = module.build_stages(study)
    before = {s.name for s in stages if stage_result(study["records_dir"], s) is not None}
    jobs, threads, why = resolved_jobs(study, overrides)
    print(f"device_call: {len(stages) - len(before)} of {len(stages)} stages to run, jobs={jobs} ({why}), "
          f"threads={threads}, {deadline - t0:.0f} s to the deadline", flush=True)
    error = None
    try:
        run_stages(stages, study["records_dir"], jobs=jobs, threads=threads, deadline=deadline,
                   log=lambda *a: print(*a, flush=True))
    except Exception as err:  # noqa: BLE001 - recorded in the summary, the records so far still go home
        error = f"{type(err).__name__}: {err}"
        print(f"device_call: a stage failed: {error}", flush=True)
    done = {s.name for s in stages if stage_result(study["records_dir"], s) is not None}
    out = {"study": module_name, "device": study["device"], "device_name": device_label(study),
           "jobs": jobs, "threads": threads, "jobs_why": why, "seconds": round(time.time() - t0, 1),
           "stages": len(stages), "done_before": len(before), "done_now": [s.name for s in stages if s.name in done - before],
           "left": [s.name for s in stages if s.name not in done], "error": error,
           "records_dir": study["records_dir"]}
    write_json(summary, out)
    return 2 if error else (1 if out["left"] else 0)


def device_label(study: dict) -> str:
    if study["device"] == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


#################################################################################
#                         What comes back, and its merge                        #
#################################################################################


def file_hashes(records: Path) -> dict[str, str]:
    """sha1 of every file under ``records`` by relative path (hidden files: locks and temporary
    files of atomic writes, never a record)."""
    out = {}
    for path in sorted(Path(records).rglob("*")):
        rel = path.relative_to(records)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


def pack(records: Path, snapshot: Path, out_dir: Path, summary: Path | None) -> dict:
    """The files of ``records`` new or changed since ``snapshot``, in tars of at most
    :data:`TAR_BYTES` (``study-1.tar``, ...; at most :data:`MAX_TARS`; what does not fit is
    listed in the summary and stays behind). The call's summary goes with them as
    ``device_calls/<UTC time>.json``: the records keep which device measured them."""
    if summary is not None and Path(summary).is_file():
        write_json(Path(records) / "device_calls" / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json",
                   json.loads(Path(summary).read_text()))
    before = json.loads(Path(snapshot).read_text()) if Path(snapshot).is_file() else {}
    changed = [rel for rel, h in file_hashes(records).items() if before.get(rel) != h]
    chunks: list[list[str]] = []
    size = TAR_BYTES
    left_out = []
    for rel in changed:  # sorted by path: a run's records and weights stay together
        n = (Path(records) / rel).stat().st_size + 1024
        if size + n > TAR_BYTES:
            if len(chunks) == MAX_TARS or n > TAR_BYTES:
                left_out.append(rel)
                continue
            chunks.append([])
            size = 0
        chunks[-1].append(rel)
        size += n
    tars = []
    for i, names in enumerate(chunks, 1):
        path = Path(out_dir) / f"study-{i}.tar"
        with tarfile.open(path, "w") as tar:
            for rel in names:
                tar.add(Path(records) / rel, arcname=rel, recursive=False)
        tars.append({"file": path.name, "files": len(names), "bytes": path.stat().st_size})
    result = {"changed_files": len(changed), "tars": tars, "left_out": left_out}
    if summary is not None:
        data = json.loads(Path(summary).read_text()) if Path(summary).is_file() else {}
        write_json(summary, {**data, "returned": result})
    return result


def safe_members(tar: tarfile.TarFile, name: str) -> list[tarfile.TarInfo]:
    members = []
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if not m.isfile() or Path(m.name).is_absolute() or ".." in parts or any(p.startswith(".") for p in parts):
            raise SystemExit(f"device_call: {name}: {m.name!r} is not a record file; nothing merged")
        members.append(m)
    return members


def unpack(records: Path, tars: list[Path]) -> dict:
    """Merge returned tars into ``records``: new files are written (atomically), identical ones
    skipped; a file that differs from the one already there is a conflict, and then nothing at
    all is written (exit 2, the conflicts listed)."""
    incoming: dict[str, bytes] = {}
    for path in tars:
        with tarfile.open(path) as tar:
            for m in safe_members(tar, str(path)):
                data = tar.extractfile(m).read()
                if incoming.get(m.name, data) != data:
                    raise SystemExit(f"device_call: {m.name} comes twice with different contents; nothing merged")
                incoming[m.name] = data
    new, same, conflicts = [], [], []
    for rel, data in sorted(incoming.items()):
        dest = Path(records) / rel
        if not dest.exists():
            new.append(rel)
        elif dest.read_bytes() == data:
            same.append(rel)
        else:
            conflicts.append(rel)
    if conflicts:
        return {"new": [], "same": same, "conflicts": conflicts}
    for rel in new:
        write_atomically(Path(records) / rel, lambda tmp: Path(tmp).write_bytes(incoming[rel]))
    return {"new": new, "same": same, "conflicts": []}


#################################################################################
#                                    Command                                    #
#################################################################################


def main(argv: list[str] | None = None) -> int:
    """The command; a bad command line or expected error is one line, exit 2 (pf.errors)."""
    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m pf.experiments.device_call", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("plan")
    a.add_argument("study")
    a.add_argument("--budget", type=float, default=540.0)
    a.add_argument("--json", type=Path)
    a.add_argument("--field", help="print only this field of the plan (records_dir, out_dir, ...)")
    a = sub.add_parser("snapshot")
    a.add_argument("records", type=Path)
    a.add_argument("file", type=Path)
    a = sub.add_parser("run")
    a.add_argument("study")
    a.add_argument("--deadline", type=float, required=True, help="time.time() seconds")
    a.add_argument("--summary", type=Path, required=True)
    a = sub.add_parser("pack")
    a.add_argument("records", type=Path)
    a.add_argument("snapshot", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--summary", type=Path)
    a = sub.add_parser("unpack")
    a.add_argument("records", type=Path)
    a.add_argument("tars", type=Path, nargs="+")
    args, rest = p.parse_known_args(argv)
    if rest and args.cmd not in ("plan", "run"):
        p.error(f"unexpected arguments: {rest}")
    if args.cmd == "plan":
        result = plan(args.study, rest, args.budget)
        if args.field:
            print(result[args.field])
            return 0
        print_plan(result)
        if args.json:
            write_json(args.json, result)
        return 0
    if args.cmd == "snapshot":
        write_json(args.file, file_hashes(args.records))
        return 0
    if args.cmd == "run":
        return run(args.study, rest, args.deadline, args.summary)
    if args.cmd == "pack":
        result = pack(args.records, args.snapshot, args.out, args.summary)
        for t in result["tars"]:
            print(f"{t['file']}: {t['files']} files, {t['bytes'] / 2**20:.1f} MiB")
        if result["left_out"]:
            print(f"NOT RETURNED (over {MAX_TARS} tars of {TAR_BYTES >> 20} MiB): {len(result['left_out'])} files; "
                  "they are made again by the next call")
        return 0
    result = unpack(args.records, args.tars)
    if result["conflicts"]:
        print(f"device_call: refused: {len(result['conflicts'])} file(s) differ from the records already in "
              f"{args.records}; nothing merged:", file=sys.stderr)
        for rel in result["conflicts"]:
            print(f"  {rel}", file=sys.stderr)
        return 2
    print(f"merged into {args.records}: {len(result['new'])} new file(s), {len(result['same'])} identical already there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
