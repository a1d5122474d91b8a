"""Every Triton kernel through Triton's real compiler for Hopper (sm_90), with no GPU.

The interpreter checks what the kernels compute; it never compiles them. ``scripts/
kernel_report.py`` runs each op's host code with compile-only launches against a named
target, so each launch form (dtypes, per-token chunk views, per-sample, indexed, of
``adaln_modulate``, ``gated_residual``, ``ada_rms_norm`` and ``gated_residual_modulate``;
the general forms and the RMSNorm sandwich; every ``patch_euler`` form) is specialised exactly as on a GPU and lowered to PTX and a cubin.
Asserted: every form compiles, nothing spills to local memory, at the PF-B/2 and PF-XL/2
widths no kernel leaves more than 10% of its column lanes empty (rows are walked in column
tiles: 1152 = 9 x 128, 768 = 3 x 256, where one power-of-two block would leave 44% and 25%
empty), and the per-token 16-bit kernels move every row with 16-byte vector accesses (the
strided ``chunk(6)`` views included), which a memory-bound op needs to reach bandwidth.
"""

import json
import subprocess
import sys

import pytest

from child_env import ROOT, child_env

triton = pytest.importorskip("triton")


def _has_nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not _has_nvidia_backend():
        pytest.skip("this Triton has no NVIDIA backend")
    tmp = tmp_path_factory.mktemp("kernel_report")
    # A private cache: the kernels are really compiled, not read back from an earlier run.
    env = child_env(drop=("TRITON_INTERPRET",), TRITON_CACHE_DIR=str(tmp / "cache"))
    shards = 2  # two processes share the compiles (each compile is one CPU's work)
    procs = [subprocess.Popen(
        [sys.executable, "scripts/kernel_report.py", "--arch", "90", "--json", str(tmp / f"report{i}.json"),
         "--shard", f"{i}/{shards}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) for i in range(shards)]  # fmt: skip
    parts, heads = [], []
    for i, proc in enumerate(procs):
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
        parts.append(json.loads((tmp / f"report{i}.json").read_text()))
        heads.append(stdout.splitlines()[0])
    return [r for part in parts for r in part], {"heads": heads, "parts": parts}


@pytest.mark.slow
def test_every_launch_form_compiles_for_sm90(report):
    rows, shards = report
    cases = {r["case"] for r in rows}
    ops = ("adaln fwd", "adaln fwd+stats", "adaln bwd", "adaln bwd-recompute", "gated fwd", "gated bwd", "rms fwd",
           "rms bwd", "resmod fwd", "resmod fwd+stats", "resmod bwd", "resmod bwd-recompute")
    for op in ops:
        for form in ("per-token", "per-sample", "indexed"):
            for width in ("B/2 D=768", "XL/2 D=1152", "odd D=37"):
                for dtype in ("bf16", "fp16", "fp32"):
                    assert f"{op} {form} {width} {dtype}" in cases
    for op in ("opts rms+shift fwd per-token", "opts rms+shift bwd per-token", "opts ungated resmod fwd per-sample "
               "fp32-mods", "opts ungated resmod bwd per-sample fp32-mods", "gated fwd per-sample fp32-gate out=bf16"):
        assert f"{op} XL/2 D=1152 bf16" in cases
    for op in ("sandwich fwd", "sandwich bwd", "sandwich last fwd", "sandwich last bwd"):  # the RMSNorm sandwich
        for form in ("per-sample", "ungated"):
            assert f"{op} {form} XL/2 D=1152 bf16" in cases
    assert {"timestep_embedding fwd dim=256", "timestep_embedding bwd dim=256"} <= cases
    assert {f"patch_euler {f} bf16" for f in ("plain", "mask", "mask+other", "in-place")} <= cases
    assert all(r["arch"] == 90 for r in rows)
    for head, part in zip(shards["heads"], shards["parts"]):
        assert f"with Triton {triton.__version__}: {len(part)} launches" in head
    # the shards split the cases: none compiled twice, every one in some shard (above)
    first, second = ({r["case"] for r in part} for part in shards["parts"])
    assert first and second and not first & second


@pytest.mark.slow
def test_no_register_spills(report):
    rows, _ = report
    assert all(r["regs"] > 0 for r in rows), "ptxas -v gave no register count"
    spilled = [(r["case"], r["spill"]) for r in rows if r["spill"] != 0]
    assert not spilled


MAX_PADDING = 0.10  # at most this fraction of a kernel's column lanes may hold no element


@pytest.mark.slow
def test_pf_widths_waste_no_lanes(report):
    """PF-B/2 (D = 768) and PF-XL/2 (D = 1152): every kernel with a column layout (all but the
    timestep embedding and patch_euler) covers D with at most MAX_PADDING of its lanes empty."""
    rows, _ = report
    wide = [r for r in rows if "B/2 D=768" in r["case"] or "XL/2 D=1152" in r["case"]]
    assert len(wide) > 100 and all(r["padding"] is not None for r in wide)
    wasteful = [(r["case"], r["kernel"], r["BLOCK_D"], r["padding"]) for r in wide if r["padding"] > MAX_PADDING]
    assert not wasteful
    assert {r["BLOCK_D"] * r.get("NUM_TILES", 1) for r in wide if "NUM_TILES" in r} <= {768, 1152}


@pytest.mark.slow
def test_per_token_rows_move_in_16_byte_vectors(report):
    """Every row element in 16-byte vectors; the only narrower accesses a per-token kernel may
    make are the per-row statistics (fp32 mean and rstd: at most two loads and two stores)."""
    rows, _ = report
    checked = 0
    for r in rows:
        if "per-token" in r["case"] and "odd" not in r["case"] and ("bf16" in r["case"] or "fp16" in r["case"]):
            assert r["ld_v2"] == 0 and r["st_v2"] == 0, r
            assert r["ld_scalar"] <= 2 and r["st_scalar"] <= 2, r
            # the statistics alone (NO_H: a backward without the forward's) writes only those
            assert r["ld_v4"] > 0 and (r["st_v4"] > 0 or "NO_H" in r["flags"].split()), r
            checked += 1
    # 12 launch forms (two of them with the statistics kernel first) x 2 widths x 2 dtypes, and the
    # general forms' RMSNorm + shift forward and backward x 2 widths in bf16
    assert checked == 60
