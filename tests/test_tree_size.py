"""The tracked tree stays small enough to travel to a lent GPU machine with room to spare.

The device tool carries the working tree to the GPU machine, 64 MiB at most, together with
whatever a call carries beside it (the wheels of scripts/device_wheels.sh, a build folder).
Half of that is the most the tracked files may take: past it, a few more kept study runs
(2.6 MB each in float16, 5 MB before) and no device call could carry the repository at all (issue 25).
"""

import os
import subprocess

import pytest

from child_env import ROOT

LIMIT_MIB = 32


def tracked_bytes() -> dict[str, int]:
    """Size in bytes of every file ``git ls-files`` lists (as in the working tree)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    sizes = {}
    for name in names.decode().split("\0"):
        path = os.path.join(ROOT, name)
        if name and os.path.isfile(path):  # a file deleted but not yet staged travels as nothing
            sizes[name] = os.path.getsize(path)
    return sizes


def _in_a_checkout() -> bool:
    return subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode == 0


@pytest.mark.skipif(not _in_a_checkout(), reason="not a git checkout (an installed package)")
def test_the_tracked_tree_is_at_most_32_mib():
    sizes = tracked_bytes()
    total = sum(sizes.values())
    by_dir: dict[str, int] = {}
    for name, size in sizes.items():
        top = "/".join(name.split("/")[:3])
        by_dir[top] = by_dir.get(top, 0) + size
    largest = ", ".join(f"{d} {s / 2**20:.1f} MiB" for d, s in sorted(by_dir.items(), key=lambda kv: -kv[1])[:5])
    assert total <= LIMIT_MIB * 2**20, f"tracked files take {total / 2**20:.1f} MiB (limit {LIMIT_MIB}); largest: {largest}"


@pytest.mark.skipif(not _in_a_checkout(), reason="not a git checkout (an installed package)")
def test_tracked_bytes_counts_every_listed_file():
    """The measure itself: a checkout's listed files, with their sizes on disk."""
    sizes = tracked_bytes()
    assert "pyproject.toml" in sizes
    assert sizes["pyproject.toml"] == os.path.getsize(os.path.join(ROOT, "pyproject.toml"))
    assert all(size >= 0 for size in sizes.values())
