"""The environment of a test's child process: this checkout first on ``PYTHONPATH``, ahead of
whatever the parent had there (on the GPU machine, the wheels gpu_check.sh installs)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(drop=(), **extra) -> dict:
    """``os.environ`` without the names in ``drop``, with ``extra`` set and ROOT on the path.

    pytest-xdist's worker variables are dropped too: a child pytest that inherits them takes
    itself for a worker (pytest-benchmark then disables timing)."""
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST_XDIST_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env
