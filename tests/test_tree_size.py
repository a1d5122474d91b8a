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


def tracked_bytes(root: str = ROOT) -> dict[str, int]:
    """Size in bytes of every file ``git ls-files`` lists (as in the working tree)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    sizes = {}
    for name in names.decode().split("\0"):
        path = os.path.join(root, name)
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


def test_tracked_bytes_counts_the_listed_files_only(tmp_path):
    """The measure itself, on a repository of known sizes: a tracked file in a folder counts,
    an untracked one does not, nor a tracked one deleted from the working tree."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(b"\0" * 3000)
    (tmp_path / "a.txt").write_text("x" * 10)
    (tmp_path / "gone.txt").write_text("y" * 500)
    subprocess.run(["git", "add", "sub/weights.bin", "a.txt", "gone.txt"], cwd=tmp_path, check=True)
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "untracked.txt").write_text("z" * 700)
    assert tracked_bytes(str(tmp_path)) == {"sub/weights.bin": 3000, "a.txt": 10}
