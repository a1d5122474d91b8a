"""Small file systems for fault tests: a tmpfs of a given size (a disk that fills up) or mounted
read-only (a folder even root cannot write). Mounting needs root (or CAP_SYS_ADMIN); where it is
refused the helpers return None and the caller skips, or uses a 0o555 folder for a normal user."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path


def mount_tmpfs(folder: Path, size: str = "1m", read_only: bool = False) -> bool:
    """Mount a tmpfs of ``size`` on ``folder`` (created); False where this machine refuses."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    options = f"size={size}" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """``folder`` on a tmpfs of ``size`` for the block, or None (the caller skips)."""
    if not mount_tmpfs(folder, size):
        yield None
        return
    try:
        yield folder
    finally:
        unmount(folder)


def read_only_folder(folder: Path) -> Path | None:
    """A folder no process may write (a read-only tmpfs for root, 0o555 for a normal user), or
    None; unmount it with :func:`unmount` when done (a no-op for the 0o555 folder)."""
    if os.geteuid() != 0:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        return folder
    return folder if mount_tmpfs(folder, "64k", read_only=True) else None
