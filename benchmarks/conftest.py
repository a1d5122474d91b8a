"""Shared benchmark fixtures (``pytest benchmarks --benchmark-only``).

- ``device``: "cuda" when available, else "cpu".
- ``copy_bandwidth``: the measured device-to-device copy bandwidth in GB/s (read + write
  bytes per second of ``dst.copy_(src)`` on 512 MiB), once per session: the practical
  limit a memory-bound kernel is compared against.
- ``time_ms(fn)``: median milliseconds of ``fn``; CUDA events via
  ``triton.testing.do_bench`` on a GPU (it flushes L2 between runs), wall clock on the CPU;
  ``graph_ms(fn)``: one call replayed from a CUDA graph (microsecond kernels).
- ``record(benchmark, fn, bytes_moved, **info)``: times ``fn`` into the pytest-benchmark
  table and puts ms, GB/s and the fraction of ``copy_bandwidth`` in ``extra_info``.
- The GPU's name, torch/triton/CUDA versions and the copy bandwidth go into the machine
  info of the saved JSON (``pytest_benchmark_update_machine_info``).
- ``PF_BENCH_JSONL=path``: each benchmark is appended to ``path`` as one JSON line the
  moment it finishes (its stats and ``extra_info``; the first line of each run also the
  machine info of the JSON file), so a run cut short by a
  time limit still keeps every number it measured (``scripts/gpu_check.sh`` relies on it;
  ``scripts/bench_table.py`` reads these files as well as ``--benchmark-json`` ones).
- ``PF_BENCH_SCOPE=quick``: the cases a lease of a few minutes can hold (largest token
  count, bf16, one sampling and one training preset); ``full`` (the default) runs all.
"""

from __future__ import annotations

import functools
import json
import os
import time
from datetime import datetime, timezone

import pytest
import torch

CUDA = torch.cuda.is_available()


def _scope() -> str:
    scope = os.environ.get("PF_BENCH_SCOPE", "full")
    if scope not in ("quick", "full"):
        raise ValueError(f"PF_BENCH_SCOPE must be 'quick' or 'full', got {scope!r}")
    return scope


QUICK = _scope() == "quick"


def measure_copy_bandwidth(device: str = "cuda", nbytes: int = 512 * 2**20) -> float:
    """GB/s of a plain copy (bytes read + bytes written per second)."""
    if device != "cuda":
        nbytes = min(nbytes, 64 * 2**20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device=device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def _copy_bandwidth_cached(device: str) -> float:
    return measure_copy_bandwidth(device)


def time_ms(fn, device: str | None = None, warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn`` in ms."""
    device = device or ("cuda" if CUDA else "cpu")
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def graph_ms(fn) -> float:
    """Median ms of one call replayed from a CUDA graph (``do_bench_cudagraph``: a call of a few
    microseconds is not timed by wall clock); CUDA events if the capture fails."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    except Exception as err:  # noqa: BLE001 - a capture failure is a finding, not a crash
        print(f"  CUDA graph timing failed ({type(err).__name__}: {err}); events instead", flush=True)
        return time_ms(fn, device="cuda")


def _synced(fn, device: str):
    if device != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if CUDA else "cpu"


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> float:
    return _copy_bandwidth_cached(device)


@pytest.fixture(name="time_ms")
def time_ms_fixture(device):
    return functools.partial(time_ms, device=device)


@pytest.fixture
def record(device, copy_bandwidth):
    """``record(benchmark, fn, bytes_moved, **info)``: see the module docstring."""

    def _record(benchmark, fn, bytes_moved: int, **info):
        ms = time_ms(fn, device=device)
        # The table's own timing (wall clock around a synchronised call); the extra_info
        # numbers come from CUDA events and are the ones to quote.
        benchmark.pedantic(_synced(fn, device), rounds=10 if device == "cuda" else 3, iterations=1, warmup_rounds=1)
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        benchmark.extra_info.update(info)
        benchmark.extra_info.update(
            device=device,
            ms=round(ms, 5),
            gb_per_s=round(gbps, 1),
            copy_gb_per_s=round(copy_bandwidth, 1),
            frac_of_copy_bw=round(gbps / copy_bandwidth, 3),
            bytes_moved=int(bytes_moved),
        )
        return ms

    return _record


def device_info() -> dict:
    """torch and Triton versions, the GPU's name (None without one) and CUDA version."""
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "gpu": None}
    if CUDA:
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(device_info())
    if CUDA:
        machine_info["copy_gb_per_s"] = round(_copy_bandwidth_cached("cuda"), 1)


_machine_streamed = False  # whether this process has written its machine info yet


@pytest.fixture(autouse=True)
def _stream_result(request):
    """Append the finished benchmark to ``$PF_BENCH_JSONL`` (see the module docstring)."""
    yield
    path = os.environ.get("PF_BENCH_JSONL")
    bench = (getattr(request.node, "funcargs", None) or {}).get("benchmark")  # None once interrupted
    if not path or bench is None or getattr(bench, "stats", None) is None:
        return  # not a benchmark, or it did not get as far as timing
    global _machine_streamed
    row = bench.stats.as_dict(include_data=False)
    row["datetime"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not _machine_streamed:  # the JSON file's machine_info (the hook above), once per process
        row["machine"] = request.config._benchmarksession.get_machine_info()
        _machine_streamed = True
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
