"""patch_dit: a classic DiT written here (per-sample c (B, D)), a per-token variant, and
pf.models.PatchForcingDiT give the same outputs and grads patched as unpatched."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pf_kernels
from pf_kernels.ops._utils import LAUNCHES
from pf_kernels.patch import unpatch_dit
from kernel_cases import needs_interp


#################################################################################
#                  A DiT in the original codebase's form (models.py)             #
#################################################################################


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Classic DiT: c (B, D); ``chunk(6, dim=1)`` and ``unsqueeze(1)``. With ``per_token`` it
    takes c (B, N, D) and splits along the last dim instead (PF-style)."""

    def __init__(self, dim, heads, per_token=False):
        super().__init__()
        self.per_token = per_token
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        if self.per_token:
            sm, cm, gm, sp, cp, gp = self.adaLN_modulation(c).chunk(6, dim=-1)
            x = x + gm * self.attn(self.norm1(x) * (1 + cm) + sm)
            return x + gp * self.mlp(self.norm2(x) * (1 + cp) + sp)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim, out, per_token=False):
        super().__init__()
        self.per_token = per_token
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        if self.per_token:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
            return self.linear(self.norm_final(x) * (1 + scale) + shift)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TinyDiT(nn.Module):
    def __init__(self, dim=32, heads=2, depth=2, out=8, per_token=False):
        super().__init__()
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, per_token) for _ in range(depth)])
        self.final_layer = FinalLayer(dim, out, per_token)
        gen = torch.Generator().manual_seed(0)
        for p in self.parameters():  # no AdaLN-Zero here: every path must carry signal
            p.data.copy_(0.2 * torch.randn(p.shape, generator=gen))

    def forward(self, x, c):
        for blk in self.blocks:
            x = blk(x, c)
        return self.final_layer(x, c)


#################################################################################
#                                    Tests                                      #
#################################################################################


@pytest.fixture
def backend():
    previous = pf_kernels.get_backend()
    yield pf_kernels.set_backend
    pf_kernels.set_backend(previous)


def run(model, x, c):
    """Output and all grads (params, x, c) of a scalar loss."""
    model.zero_grad()
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    out = model(x, c)
    out.square().mean().backward()
    # (a compiled module names its parameters "_orig_mod.<name>")
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, x.grad, c.grad


def assert_same(a, b, atol=2e-5, rtol=2e-5):
    out_a, grads_a, gx_a, gc_a = a
    out_b, grads_b, gx_b, gc_b = b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    torch.testing.assert_close(gx_a, gx_b, atol=atol, rtol=rtol)
    torch.testing.assert_close(gc_a, gc_b, atol=atol, rtol=rtol)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], atol=atol, rtol=rtol, msg=k)


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("mode", [pytest.param("triton", marks=needs_interp), "auto"])
def test_tiny_dit(per_token, mode, backend):
    backend(mode)
    model = TinyDiT(per_token=per_token)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 32, generator=gen)
    c = torch.randn(2, 5, 32, generator=gen) if per_token else torch.randn(2, 32, generator=gen)
    expected = run(model, x, c)

    patched_model = copy.deepcopy(model)
    assert pf_kernels.patch_dit(patched_model) == 3  # two blocks and the final layer
    launches = LAUNCHES["adaln_modulate_fwd"], LAUNCHES["gated_residual_modulate_fwd"]
    got = run(patched_model, x, c)
    if mode == "triton":  # per block: the attention's input, then its residual fused with the MLP's input
        assert LAUNCHES["adaln_modulate_fwd"] == launches[0] + 3  # 1 per block + final
        assert LAUNCHES["gated_residual_modulate_fwd"] == launches[1] + 2
    assert_same(got, expected)

    assert pf_kernels.patch_dit(patched_model) == 0  # already patched
    assert unpatch_dit(patched_model) == 3
    assert_same(run(patched_model, x, c), expected, atol=0, rtol=0)


@pytest.mark.parametrize("mode", [pytest.param("triton", marks=needs_interp), "auto"])
def test_patched_modules_take_an_index(mode, backend):
    """Deduplicated conditioning: patched modules called as (x, table (B, K, D), index (B, N))
    match the unpatched ones on the gathered per-token c (B, N, D), grads included."""
    backend(mode)
    model = TinyDiT(per_token=True)
    gen = torch.Generator().manual_seed(5)
    x0, table0 = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 2, 32, generator=gen)
    index = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])

    def forward(m, x, table, use_index):
        c = table if use_index else table.gather(1, index[:, :, None].expand(-1, -1, 32))
        extra = (index,) if use_index else ()
        for blk in m.blocks:
            x = blk(x, c, *extra)
        return m.final_layer(x, c, *extra)

    results = []
    for use_index in (False, True):
        if use_index:
            assert pf_kernels.patch_dit(model) == 3
        model.zero_grad()
        x, table = x0.clone().requires_grad_(), table0.clone().requires_grad_()
        out = forward(model, x, table, use_index)
        out.square().mean().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}, x.grad, table.grad))
    assert_same(results[1], results[0])


def test_skips_affine_norms_and_other_widths():
    model = TinyDiT()
    model.blocks[0].norm1 = nn.LayerNorm(32, eps=1e-6)  # affine: fusing would drop its weight
    model.final_layer.adaLN_modulation[1] = nn.Linear(32, 3 * 32)  # not (shift, scale)
    with pytest.warns(UserWarning, match=r"left blocks.0 \(DiTBlock\) as it is: norm1 is not a LayerNorm"):
        report = pf_kernels.patch_dit(model)
    assert report == 1 and [n for n, _ in report.skipped] == ["blocks.0", "final_layer"]
    assert "adaLN_modulation gives 96 features, not 2 x 32" in report.skipped[1][1]
    assert str(report).startswith("patched 1 module(s), skipped 2: blocks.0 (")
    assert pf_kernels.patch_dit(nn.Sequential(nn.Linear(2, 2))) == 0


class ScaledBlock(DiTBlock):
    """A subclass with one more submodule in its forward: named like a DiT block, computing
    something else (a user's variant)."""

    def __init__(self, dim, heads):
        super().__init__(dim, heads)
        self.extra = nn.Linear(dim, dim)

    def forward(self, x, c):
        return super().forward(x, c) + self.extra(x)


def test_a_block_whose_forward_differs_is_left_alone_and_named():
    model = TinyDiT()
    variant = ScaledBlock(32, 2)
    variant.load_state_dict({**model.blocks[1].state_dict(), **{f"extra.{k}": v for k, v in
                                                                 nn.Linear(32, 32).state_dict().items()}})
    model.blocks[1] = variant
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    before = model(x, c)
    with pytest.warns(UserWarning, match=r"blocks.1 \(ScaledBlock\) as it is: its forward computes something else"):
        report = pf_kernels.patch_dit(model)
    assert report == 2 and report.skipped[0][0] == "blocks.1"  # blocks.0 and the final layer are patched
    torch.testing.assert_close(model(x, c), before, atol=2e-5, rtol=2e-5)  # the output did not change


def test_hooks_on_a_bypassed_norm_refuse_the_patch():
    model = TinyDiT()
    seen = []
    model.blocks[0].norm2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with pytest.warns(UserWarning, match="norm2 has forward hooks"):
        report = pf_kernels.patch_dit(model)
    assert report == 2 and report.skipped[0][0] == "blocks.0"
    model(torch.randn(2, 5, 32), torch.randn(2, 32))
    assert seen == [torch.Size([2, 5, 32])]  # the hook still fires: that block was not patched
    hooked = []
    model.blocks[1].register_forward_hook(lambda m, i, o: hooked.append(1))  # on a patched module: fires
    model(torch.randn(2, 5, 32), torch.randn(2, 32))
    assert hooked == [1]


def test_a_forward_replaced_on_the_instance_refuses_the_patch():
    model = TinyDiT()
    inner = model.blocks[0].forward
    model.blocks[0].forward = lambda x, c: 2 * inner(x, c)  # e.g. a hook library's wrapper
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    before = model(x, c)
    with pytest.warns(UserWarning, match=r"blocks.0 \(DiTBlock\) as it is: its forward is replaced on the instance"):
        report = pf_kernels.patch_dit(model)
    assert report == 2 and report.skipped[0][0] == "blocks.0"
    torch.testing.assert_close(model(x, c), before, atol=2e-5, rtol=2e-5)  # the wrapper still runs


class RopeAttention(Attention):
    def forward(self, x, freqs):  # takes more than the tokens: the fused path cannot call it
        return super().forward(x * torch.cos(freqs))


class RopeBlock(DiTBlock):
    def __init__(self, dim, heads):
        super().__init__(dim, heads)
        self.attn = RopeAttention(dim, heads)

    def forward(self, x, c):
        freqs = torch.linspace(0, 1, x.shape[1]).unsqueeze(-1)  # (N, 1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), freqs)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def test_a_block_whose_submodules_take_other_arguments_is_skipped_not_an_error():
    model = TinyDiT()
    model.blocks[1] = RopeBlock(32, 2)
    with pytest.warns(UserWarning, match=r"blocks.1 \(RopeBlock\) as it is: the fused forward cannot call its submodules"):
        report = pf_kernels.patch_dit(model)
    assert report == 2 and report.skipped[0][0] == "blocks.1"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_judged_by_what_they_compute(dtype, backend):
    backend("torch")  # the interpreter has no half precision; the GPU test below runs the kernels
    model = TinyDiT(dim=64, heads=4)
    x, c = torch.randn(2, 5, 64), torch.randn(2, 64)
    expected = model(x, c)  # float32
    half = copy.deepcopy(model).to(dtype)
    assert pf_kernels.patch_dit(half) == 3
    torch.testing.assert_close(half(x.to(dtype), c.to(dtype)).float(), expected, atol=0.15, rtol=0.05)
    variant = TinyDiT(dim=64, heads=4)
    variant.blocks[1] = ScaledBlock(64, 4)
    with pytest.warns(UserWarning, match="its forward computes something else"):
        assert pf_kernels.patch_dit(variant.to(dtype)) == 2  # a real difference is still found


def test_a_patched_model_pickles_and_keeps_its_state_dict(tmp_path):
    model = TinyDiT()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert pf_kernels.patch_dit(model) == 3
    assert model.state_dict().keys() == state.keys() and all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(loaded(x, c), model(x, c), atol=0, rtol=0)
    assert isinstance(loaded.blocks[0].forward, pf_kernels.patch.FusedForward)
    assert loaded.blocks[0].forward.module is loaded.blocks[0]  # bound to the loaded module, not the saved one
    twin = copy.deepcopy(model)  # e.g. an EMA copy
    with torch.no_grad():
        twin.blocks[0].attn.proj.weight.mul_(2)
    assert twin.blocks[0].forward.module is twin.blocks[0]
    assert not torch.allclose(twin(x, c), model(x, c))


def test_compile_patched_dit_cpu(backend):
    """The patched model traces whole under torch.compile (CPU: the torch path)."""
    backend("auto")
    model = TinyDiT()
    gen = torch.Generator().manual_seed(2)
    x, c = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 32, generator=gen)
    expected = run(model, x, c)
    assert pf_kernels.patch_dit(model) == 3
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same(run(compiled, x, c), expected)


def _pf_model():
    from pf.models import PatchForcingDiT

    model = PatchForcingDiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10, class_dropout_prob=0.0
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # undo AdaLN-Zero so every fused op carries signal
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _run_pf(model, x, t, y):
    model.zero_grad()
    x = x.clone().requires_grad_()
    v, logvar = model(x, t, y, return_uncertainty=True)
    (v.square().mean() + logvar.square().mean()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return torch.cat([v, logvar], 1).detach(), grads, x.grad, x.grad


@needs_interp
@pytest.mark.parametrize("per_sample_t", [False, True], ids=["t_per_patch", "t_per_sample"])
def test_patch_forcing_dit(per_sample_t, backend):
    """PatchForcingDiT already calls the fused ops (each residual fused with the next modulation,
    across blocks too): torch reference vs its own Triton route, with per-patch (B, N) and
    per-sample (B,) times; patch_dit finds nothing of it to patch."""
    model = _pf_model()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.rand(2, generator=gen) if per_sample_t else torch.rand(2, 16, generator=gen)
    y = torch.tensor([1, 10])
    backend("torch")
    expected = _run_pf(model, x, t, y)
    backend("triton")
    launches = LAUNCHES["gated_residual_modulate_bwd"]
    assert_same(_run_pf(model, x, t, y), expected)
    assert LAUNCHES["gated_residual_modulate_bwd"] == launches + 4  # two per block
    report = pf_kernels.patch_dit(model)
    assert report == 0 and not report.skipped


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_dit_gpu_compiled(dtype, backend):
    backend("auto")
    model = TinyDiT(dim=128, heads=4).cuda().to(dtype)
    x = torch.randn(4, 64, 128, device="cuda", dtype=dtype)
    c = torch.randn(4, 128, device="cuda", dtype=dtype)
    expected = run(model, x, c)
    assert pf_kernels.patch_dit(model) == 3
    torch._dynamo.reset()
    got = run(torch.compile(model, fullgraph=True), x, c)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=5e-2)
    assert_same(got, expected, **tol)


@needs_interp
def test_patch_forcing_dit_deduplicated(backend, monkeypatch):
    """At inference PatchForcingDiT computes one modulation per distinct patch time and reads
    it through the indexed ops (issue 6): Triton route and patched model vs the reference."""
    model = _pf_model().eval()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.where(torch.rand(2, 16, generator=gen) < 0.4, 0.3, 0.7)  # two distinct times per sample
    y = torch.tensor([3, 10])
    backend("torch")
    expected = _run_pf(model, x, t, y)
    backend("triton")
    launches = LAUNCHES["adaln_modulate_fwd"], LAUNCHES["gated_residual_modulate_fwd"]
    indexed_calls = []
    real = pf_kernels.gated_residual_modulate_indexed
    monkeypatch.setattr(pf_kernels, "gated_residual_modulate_indexed", lambda *a: indexed_calls.append(1) or real(*a))
    assert_same(_run_pf(model, x, t, y), expected)
    # the first block's input, then two fused calls per block (the last one makes the final layer's input)
    assert LAUNCHES["adaln_modulate_fwd"] == launches[0] + 1 and len(indexed_calls) == 4
    assert LAUNCHES["gated_residual_modulate_fwd"] == launches[1] + 4


def test_unpatch_keeps_a_wrapper_installed_after_the_patch():
    """A hook library wrapping a patched forward (as diffusers' and accelerate's hooks do):
    unpatch_dit leaves the wrapper in place, which then runs the module's own forward."""
    model = TinyDiT()
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    before = model(x, c)
    assert pf_kernels.patch_dit(model) == 3
    calls = []
    inner = model.blocks[0].forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    model.blocks[0].forward = wrapper
    assert unpatch_dit(model) == 3
    assert model.blocks[0].__dict__["forward"] is wrapper  # the wrapper stays
    torch.testing.assert_close(model(x, c), before, atol=2e-5, rtol=2e-5)
    assert calls == [1]
    assert not inner.active  # under it, the module's own forward runs
