"""Backend selection (PF_KERNELS_BACKEND / set_backend), argument checks, torch.compile tracing."""

import subprocess
import sys

import pytest
import torch

import pf_kernels
from pf_kernels.ops._utils import LAUNCHES
from child_env import child_env
from kernel_cases import needs_interp



@pytest.fixture
def restore_backend():
    previous = pf_kernels.get_backend()
    yield
    pf_kernels.set_backend(previous)


def inputs(b=2, n=3, d=16, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(b, n, d, generator=gen).to(device, dtype) for _ in range(2))
    c = torch.randn(b, n, 6 * d, generator=gen).to(device, dtype)
    return x, c, y


def block(x, c, y, t):
    """Every op once: what a PF block + sampler step does with them."""
    shift, scale, gate = c.chunk(6, dim=-1)[:3]
    h = pf_kernels.adaln_modulate(x, shift, scale)
    out = pf_kernels.gated_residual(x, gate, h * y)
    emb = pf_kernels.timestep_embedding(t, out.shape[-1])  # (B, N, D)
    return out + emb.to(out.dtype)


def _run_child(code: str, **env) -> subprocess.CompletedProcess:
    full_env = child_env(drop=("TRITON_INTERPRET", "PF_KERNELS_BACKEND"), **env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


def test_set_get_backend(restore_backend):
    for name in ("torch", "triton", "auto", " AUTO "):
        pf_kernels.set_backend(name)
        assert pf_kernels.get_backend() == name.strip().lower()
    with pytest.raises(ValueError, match="must be one of"):
        pf_kernels.set_backend("cuda")


def test_env_var_and_cpu_without_interpreter():
    """In a fresh process: the env var picks the backend; 'triton' on CPU tensors without the
    interpreter is a clear error; 'auto' on CPU quietly takes the reference."""
    code = (
        "import torch, pf_kernels\n"
        "assert pf_kernels.get_backend() == 'triton', pf_kernels.get_backend()\n"
        "x = torch.randn(1, 2, 8)\n"
        "try:\n"
        "    pf_kernels.adaln_modulate(x, x, x)\n"
        "    raise SystemExit('no error')\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "pf_kernels.set_backend('auto')\n"
        "pf_kernels.adaln_modulate(x, x, x)\n"
        "print('ok')\n"
    )
    res = _run_child(code, PF_KERNELS_BACKEND="triton")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_bad_env_value():
    from pf_kernels.dispatch import _validated  # what the import applies to PF_KERNELS_BACKEND

    with pytest.raises(ValueError, match="PF_KERNELS_BACKEND"):
        _validated("bogus")


@needs_interp
def test_routing(restore_backend):
    x, c, y = inputs()
    shift, scale = c.chunk(6, dim=-1)[:2]
    before = LAUNCHES["adaln_modulate_fwd"]
    pf_kernels.set_backend("auto")  # CPU tensors -> reference
    ref = pf_kernels.adaln_modulate(x, shift, scale)
    pf_kernels.set_backend("torch")
    pf_kernels.adaln_modulate(x, shift, scale)
    assert LAUNCHES["adaln_modulate_fwd"] == before
    pf_kernels.set_backend("triton")
    pf_kernels.adaln_modulate(x.double(), shift.double(), scale.double())  # float64 -> reference
    assert LAUNCHES["adaln_modulate_fwd"] == before
    out = pf_kernels.adaln_modulate(x, shift, scale)
    assert LAUNCHES["adaln_modulate_fwd"] == before + 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_argument_checks():
    x, c, y = inputs()
    shift = c[..., :16]
    with pytest.raises(ValueError, match="x must be"):
        pf_kernels.adaln_modulate(x[0], shift[0], shift[0])
    with pytest.raises(ValueError, match="shift must be"):
        pf_kernels.adaln_modulate(x, shift[:, :2], shift)
    with pytest.raises(ValueError, match="gate must be"):
        pf_kernels.gated_residual(x, c, y)
    with pytest.raises(ValueError, match="y must have"):
        pf_kernels.gated_residual(x, shift, y[:, :1])
    with pytest.raises(ValueError, match="divisible"):
        pf_kernels.patch_euler(torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 5, 4), torch.zeros(1, 4), 2)
    with pytest.raises(ValueError, match="dt must have"):
        pf_kernels.patch_euler(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 3), 2)


# The public custom-op schemas. triton_op infers them from the op functions' annotations on
# every supported torch (2.11 ignores an explicit schema string), so these pin the result.
SCHEMAS = {
    "adaln_modulate": "(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor",
    "adaln_modulate_indexed": "(Tensor x, Tensor shift, Tensor scale, Tensor index, float eps) -> Tensor",
    "adaln_modulate_with_stats": "(Tensor x, Tensor shift, Tensor scale, Tensor? index, float eps) -> (Tensor, Tensor)",
    "adaln_modulate_backward": "(Tensor grad, Tensor x, Tensor shift, Tensor scale, Tensor? index, float eps,"
    " Tensor? stats=None) -> (Tensor, Tensor, Tensor)",
    "gated_residual": "(Tensor x, Tensor gate, Tensor y) -> Tensor",
    "gated_residual_indexed": "(Tensor x, Tensor gate, Tensor y, Tensor index) -> Tensor",
    "gated_residual_backward": "(Tensor grad, Tensor gate, Tensor y, Tensor? index) -> (Tensor, Tensor)",
    "patch_euler_": "(Tensor(a0!) out, Tensor? x, Tensor v, Tensor dt, SymInt patch_size, Tensor? v_other,"
    " Tensor? mask) -> ()",
    "timestep_embedding": "(Tensor t, SymInt dim, float max_period) -> Tensor",
    "timestep_embedding_backward": "(Tensor grad, Tensor t, SymInt dim, float max_period) -> Tensor",
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_registered_schemas(name):
    schema = str(getattr(torch.ops.pf_kernels, name).default._schema)
    assert schema == f"pf_kernels::{name}{SCHEMAS[name]}"


def test_compile_fullgraph_cpu_reference(restore_backend):
    """auto on the CPU = the torch path: a block of the ops traces whole, forward and backward."""
    pf_kernels.set_backend("auto")
    x, c, y = inputs()
    t = torch.rand(2, 3)
    leaves = [a.clone().requires_grad_() for a in (x, c, y)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves, t)
    out.square().sum().backward()
    eager_leaves = [a.clone().requires_grad_() for a in (x, c, y)]
    ref = block(*eager_leaves, t)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@needs_interp
def test_compile_fullgraph_triton_ops_interpreter(restore_backend):
    """The Triton route (custom ops) also traces with fullgraph=True. Under the interpreter
    the ops stay opaque nodes (triton_op's kernel capture needs compiled kernels; see
    test_op_adaln_modulate.test_opcheck); the kernels run when the graph executes."""
    pf_kernels.set_backend("triton")
    x, c, y = inputs()
    t = torch.rand(2, 3)
    leaves = [a.clone().requires_grad_() for a in (x, c, y)]
    torch._dynamo.reset()
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(*leaves, t)
        out.square().sum().backward()
    torch._dynamo.reset()
    pf_kernels.set_backend("torch")
    eager_leaves = [a.clone().requires_grad_() for a in (x, c, y)]
    ref = block(*eager_leaves, t)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_gpu(dtype, restore_backend):
    """On a GPU, inductor captures the Triton kernels themselves (triton_op + wrap_triton)."""
    pf_kernels.set_backend("auto")
    x, c, y = inputs(4, 64, 1152, "cuda", dtype)
    t = torch.rand(4, 64, device="cuda")
    leaves = [a.clone().requires_grad_() for a in (x, c, y)]
    torch._dynamo.reset()
    out = torch.compile(block, fullgraph=True)(*leaves, t)
    out.float().square().sum().backward()
    eager_leaves = [a.clone().requires_grad_() for a in (x, c, y)]
    ref = block(*eager_leaves, t)
    ref.float().square().sum().backward()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, **tol)


def test_launchers_trace_with_symbolic_shapes(monkeypatch):
    """What triton_op's decomposition does under torch.compile(dynamic=True) on a GPU: run
    the host launchers on symbolic shapes. Block sizes (constexpr) must come out as plain
    ints, grids may stay symbolic. The kernel launch itself is stubbed (no GPU here)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import pf_kernels.ops.adaln_modulate as adaln
    import pf_kernels.ops.gated_residual as gated
    import pf_kernels.ops.norm_modulate as family
    import pf_kernels.ops.patch_euler as euler
    import pf_kernels.ops.timestep_embedding as temb

    launches = []

    class Stub:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    for module in (family, gated, euler, temb):
        monkeypatch.setattr(module, "wrap", Stub)
    x = torch.randn(2, 300, 48)
    mod = torch.randn(2, 300, 96)
    mod1 = torch.randn(2, 1, 96)
    index = torch.zeros(2, 300, dtype=torch.int64)
    cases = [
        (lambda x, m: adaln.adaln_modulate_fwd(x, *m.chunk(2, -1), None, 1e-6), (x, mod)),
        (lambda g, x, m: adaln.adaln_modulate_bwd(g, x, *m.chunk(2, -1), None, 1e-6), (x, x, mod1)),
        (lambda g, x, m, i: adaln.adaln_modulate_bwd(g, x, *m.chunk(2, -1), i, 1e-6), (x, x, mod1, index)),
        (lambda x, m: adaln.adaln_modulate_fwd_stats(x, *m.chunk(2, -1), None, 1e-6), (x, mod1)),
        (lambda g, x, m, s: adaln.adaln_modulate_bwd(g, x, *m.chunk(2, -1), None, 1e-6, s), (x, x, mod1, x[..., :2])),
        (lambda x, m, y: gated.gated_residual_fwd(x, m[..., :48], y, None), (x, mod, x)),
        (lambda g, m, y: gated.gated_residual_bwd(g, m[..., :48], y, None), (x, mod1, x)),
        (lambda g, m, y, i: gated.gated_residual_bwd(g, m[..., :48], y, i), (x, mod1, x, index)),
        (lambda t: temb.timestep_embedding_fwd(t, 256, 1e4), (torch.rand(2, 300),)),
        (lambda g, t: temb.timestep_embedding_bwd(g, t, 256, 1e4), (torch.rand(2, 300, 256), torch.rand(2, 300))),
        (lambda o, x, v, dt: euler.patch_euler_launch(o, x, v, dt, 2, None, None), (torch.empty(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 16))),
    ]
    for fn, args in cases:
        make_fx(fn, tracing_mode="symbolic")(*args)
    # the two adaln backwards without the forward's statistics add ln_stats, the indexed one
    # its table-grads kernel
    assert len(launches) == len(cases) + 3
    for kwargs in launches:
        for name, value in kwargs.items():
            if name.isupper() or name == "num_warps":
                assert type(value) in (int, bool), (name, value)


def test_inputs_on_two_devices_get_a_clear_error():
    x = torch.randn(2, 3, 8)
    meta = torch.empty(2, 3, 8, device="meta")
    with pytest.raises(ValueError, match=r"adaln_modulate: the tensors must be on one device, got x on cpu, "
                                         r"shift on meta, scale on cpu"):
        pf_kernels.adaln_modulate(x, meta, x)
    with pytest.raises(ValueError, match=r"gated_residual: the tensors must be on one device"):
        pf_kernels.gated_residual(x, x, meta)
    idx = torch.zeros(2, 3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"gated_residual_indexed: .* index on meta"):
        pf_kernels.gated_residual_indexed(x, x[:, :1], x, idx)
    img = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"patch_euler: the tensors must be on one device, .*dt on meta"):
        pf_kernels.patch_euler(img, img, torch.empty(1, 4, device="meta"), 2)


def test_launches_run_with_the_inputs_device_current():
    from types import SimpleNamespace

    from pf_kernels.dispatch import _launch_on

    guard = _launch_on(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # entered around each launch
    assert not isinstance(_launch_on(torch.zeros(1)), torch.cuda.device)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_on_the_second_gpu_while_the_first_is_current(restore_backend):
    pf_kernels.set_backend("triton")
    torch.cuda.set_device(0)
    x = torch.randn(2, 7, 48, device="cuda:1", requires_grad=True)
    shift, scale = torch.randn(2, 1, 48, device="cuda:1"), torch.randn(2, 1, 48, device="cuda:1")
    out = pf_kernels.adaln_modulate(x, shift, scale)
    out.sum().backward()
    ref = torch.nn.functional.layer_norm(x.detach(), (48,), eps=1e-6) * (1 + scale) + shift
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.device == x.grad.device == torch.device("cuda", 1)


@needs_interp
def test_a_batch_over_the_grid_limit_is_refused_under_triton(restore_backend, monkeypatch):
    """CUDA grids take at most 65535 programs on the batch axis; the interpreter has no limit,
    so the limit is lowered and made to apply to CPU tensors here."""
    from pf_kernels import dispatch

    monkeypatch.setattr(dispatch, "MAX_GRID_BATCH", 2)
    x = torch.randn(3, 4, 8)
    shift, scale = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    pf_kernels.set_backend("triton")
    before = LAUNCHES["adaln_modulate_fwd"]
    pf_kernels.adaln_modulate(x, shift, scale)  # no limit on this device type
    assert LAUNCHES["adaln_modulate_fwd"] == before + 1
    monkeypatch.setattr(dispatch, "GRID_LIMITED", ("cpu",))
    with pytest.raises(ValueError, match=r"batch B=3 is over 2, the most the row kernels' CUDA grid takes"):
        pf_kernels.adaln_modulate(x, shift, scale)
    pf_kernels.adaln_modulate(x[:2], shift[:2], scale[:2])
    assert LAUNCHES["adaln_modulate_fwd"] == before + 2


@pytest.mark.gpu
def test_a_batch_over_the_grid_limit_takes_the_torch_path_under_auto(restore_backend):
    pf_kernels.set_backend("auto")
    x = torch.randn(65536, 1, 8, device="cuda")
    shift, scale = torch.randn(65536, 1, 8, device="cuda"), torch.randn(65536, 1, 8, device="cuda")
    before = LAUNCHES["adaln_modulate_fwd"]
    out = pf_kernels.adaln_modulate(x, shift, scale)
    assert LAUNCHES["adaln_modulate_fwd"] == before
    ref = torch.nn.functional.layer_norm(x, (8,), eps=1e-6) * (1 + scale) + shift
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_use_backend_restores_the_previous_backend_even_after_an_error():
    previous = pf_kernels.get_backend()
    with pf_kernels.use_backend("torch"):
        assert pf_kernels.get_backend() == "torch"
    assert pf_kernels.get_backend() == previous
    with pytest.raises(RuntimeError, match="boom"):
        with pf_kernels.use_backend("triton"):
            assert pf_kernels.get_backend() == "triton"
            raise RuntimeError("boom")
    assert pf_kernels.get_backend() == previous
    with pytest.raises(ValueError, match="backend must be one of"):
        with pf_kernels.use_backend("cuda"):
            pass
    assert pf_kernels.get_backend() == previous
