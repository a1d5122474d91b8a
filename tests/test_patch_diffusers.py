"""patch_diffusers: tiny, fully random diffusers transformers give the same outputs and the same
input and parameter grads patched (Triton kernels, interpreter on the CPU) as unpatched (diffusers'
own eager code); the patched model keeps working with attention processors, regional compilation,
pickling and diffusers' hooks registered after the patch, and refuses hooks registered before it.
"""

import copy
import io

import pytest
import torch

import pf_kernels
from pf_kernels.diffusers_patch import FusedForward, patch_diffusers, unpatch_diffusers
from pf_kernels.ops._utils import LAUNCHES
from kernel_cases import needs_interp

diffusers = pytest.importorskip("diffusers")

B = 2


def randomise(model, seed=0):
    """Every parameter redrawn (zero-initialised gates and projections would hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 4
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model.eval()


def dit():
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, num_layers=2,
                                            sample_size=4, patch_size=2, num_embeds_ada_norm=10)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(B, 4, 4, 4, generator=gen), timestep=torch.tensor([3, 801]),
                  class_labels=torch.tensor([1, 7]))
    return model, inputs, {"AdaLayerNormZero": 2, "BasicTransformerBlock": 2}


def pixart():
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                               out_channels=8, num_layers=2, sample_size=4, patch_size=2,
                                               cross_attention_dim=24, caption_channels=16)
    gen = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(B, 4, 4, 4, generator=gen),
                  encoder_hidden_states=torch.randn(B, 5, 16, generator=gen), timestep=torch.tensor([3, 801]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs, {"BasicTransformerBlock": 2}


def flux():
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=3, joint_attention_dim=16,
                                             pooled_projection_dim=12, axes_dims_rope=(2, 2, 4))
    gen = torch.Generator().manual_seed(3)
    n, t = 6, 5
    inputs = dict(hidden_states=torch.randn(B, n, 8, generator=gen),
                  encoder_hidden_states=torch.randn(B, t, 16, generator=gen),
                  pooled_projections=torch.randn(B, 12, generator=gen), timestep=torch.tensor([0.3, 0.9]),
                  img_ids=torch.randint(0, 4, (n, 3), generator=gen).float(), txt_ids=torch.zeros(t, 3))
    return model, inputs, {"AdaLayerNormZero": 2, "AdaLayerNormZeroSingle": 1, "AdaLayerNormContinuous": 1,
                           "FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1}


def sd3():
    model = diffusers.SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=3, joint_attention_dim=16,
                                            caption_projection_dim=24, pooled_projection_dim=12, out_channels=4,
                                            pos_embed_max_size=4, dual_attention_layers=(0,))
    gen = torch.Generator().manual_seed(4)
    inputs = dict(hidden_states=torch.randn(B, 4, 4, 4, generator=gen),
                  encoder_hidden_states=torch.randn(B, 5, 16, generator=gen),
                  pooled_projections=torch.randn(B, 12, generator=gen), timestep=torch.tensor([3.0, 801.0]))
    # block 0: SD3.5's dual attention (SD35AdaLayerNormZeroX); block 1 is the last (its context
    # stream ends in AdaLayerNormContinuous); the model's own norm_out another
    return model, inputs, {"SD35AdaLayerNormZeroX": 1, "AdaLayerNormZero": 2, "AdaLayerNormContinuous": 2,
                           "JointTransformerBlock": 2}


def wan():
    model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                            in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                            num_layers=2, cross_attn_norm=True, rope_max_seq_len=32)
    gen = torch.Generator().manual_seed(5)
    inputs = dict(hidden_states=torch.randn(B, 4, 2, 4, 4, generator=gen), timestep=torch.tensor([3, 801]),
                  encoder_hidden_states=torch.randn(B, 5, 16, generator=gen))
    return model, inputs, {"WanTransformerBlock": 2}


def ltx():
    model = diffusers.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                                 attention_head_dim=12, cross_attention_dim=24, num_layers=2,
                                                 caption_channels=16)
    gen = torch.Generator().manual_seed(6)
    n = 6
    inputs = dict(hidden_states=torch.randn(B, n, 8, generator=gen),
                  encoder_hidden_states=torch.randn(B, 5, 16, generator=gen),
                  timestep=(1000 * torch.rand(B, n, generator=gen)).round(),  # per token: (B, N, 6D) modulation
                  encoder_attention_mask=torch.ones(B, 5), num_frames=1, height=2, width=3)
    return model, inputs, {"LTXVideoTransformerBlock": 2}


def cogvideox():
    model = diffusers.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                  out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=1,
                                                  sample_width=4, sample_height=4, sample_frames=1, patch_size=2,
                                                  max_text_seq_length=5)
    gen = torch.Generator().manual_seed(7)
    inputs = dict(hidden_states=torch.randn(B, 1, 4, 4, 4, generator=gen),
                  encoder_hidden_states=torch.randn(B, 5, 16, generator=gen), timestep=torch.tensor([3, 801]))
    return model, inputs, {"CogVideoXLayerNormZero": 2}  # affine LayerNorms over both streams


def sana():
    model = diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                             attention_head_dim=12,
                                             num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=12,
                                             cross_attention_dim=24, caption_channels=16, sample_size=4)
    gen = torch.Generator().manual_seed(8)
    inputs = dict(hidden_states=torch.randn(B, 4, 2, 3, generator=gen),
                  encoder_hidden_states=torch.randn(B, 5, 16, generator=gen), timestep=torch.tensor([3, 801]))
    return model, inputs, {"SanaTransformerBlock": 1}


def hunyuan_video():
    model = diffusers.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                     attention_head_dim=12, num_layers=1, num_single_layers=1,
                                                     num_refiner_layers=1, patch_size=1, text_embed_dim=16,
                                                     pooled_projection_dim=8, rope_axes_dim=(2, 4, 6),
                                                     guidance_embeds=False)
    gen = torch.Generator().manual_seed(9)
    inputs = dict(hidden_states=torch.randn(B, 4, 1, 2, 3, generator=gen), timestep=torch.tensor([3, 801]),
                  encoder_hidden_states=torch.randn(B, 5, 16, generator=gen),
                  encoder_attention_mask=torch.ones(B, 5), pooled_projections=torch.randn(B, 8, generator=gen))
    return model, inputs, {"AdaLayerNormZero": 2, "AdaLayerNormZeroSingle": 1, "AdaLayerNormContinuous": 1,
                           "HunyuanVideoTransformerBlock": 1, "HunyuanVideoSingleTransformerBlock": 1}


def lumina2():
    model = diffusers.Lumina2Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, hidden_size=24,
                                                num_layers=1, num_refiner_layers=1, num_attention_heads=2,
                                                num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 4, 4),
                                                axes_lens=(16, 16, 16), cap_feat_dim=16)
    gen = torch.Generator().manual_seed(10)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[1, -2:] = False  # padded caption tokens
    inputs = dict(hidden_states=torch.randn(B, 4, 4, 4, generator=gen), timestep=torch.tensor([0.3, 0.9]),
                  encoder_hidden_states=torch.randn(B, 5, 16, generator=gen), encoder_attention_mask=mask)
    # the layer and the noise refiner (modulated), the context refiner (modulation=False: ungated)
    return model, inputs, {"LuminaRMSNormZero": 2, "Lumina2TransformerBlock": 3}


def mochi():
    model = diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=12,
                                              num_layers=2, pooled_projection_dim=16, in_channels=4,
                                              text_embed_dim=16, time_embed_dim=8, max_sequence_length=8)
    gen = torch.Generator().manual_seed(11)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[0, -1] = False
    inputs = dict(hidden_states=torch.randn(B, 4, 2, 4, 4, generator=gen), timestep=torch.tensor([3, 801]),
                  encoder_hidden_states=torch.randn(B, 5, 16, generator=gen), encoder_attention_mask=mask)
    # block 1 is the last (context_pre_only: its context stream ends in MochiLayerNormContinuous)
    return model, inputs, {"MochiRMSNormZero": 3, "AdaLayerNormContinuous": 1, "MochiTransformerBlock": 2}


FAMILIES = {"dit": dit, "pixart": pixart, "sana": sana, "sd3": sd3, "flux": flux, "hunyuan_video": hunyuan_video,
            "wan": wan, "ltx": ltx, "cogvideox": cogvideox, "lumina2": lumina2, "mochi": mochi}


def run(model, inputs, backend):
    """(output, input grads, parameter grads) of a fixed random projection of the output."""
    model.zero_grad(set_to_none=True)
    leaves = {k: v.clone().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() and k != "timestep"
              and not k.endswith(("_ids", "_mask")) else v for k, v in inputs.items()}
    # (no grads for ids and masks: a mask enters as a -1e4 bias, its grads (~1e4) agree to ~1e-7 relative only)
    with pf_kernels.use_backend(backend):
        out = model(**leaves).sample
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weight).sum().backward()
    grads = {k: v.grad for k, v in leaves.items() if torch.is_tensor(v) and v.requires_grad}
    return out.detach(), grads, {n: p.grad for n, p in model.named_parameters()}


def assert_same(a, b, tol=1e-5):
    out_a, in_a, par_a = a
    out_b, in_b, par_b = b
    torch.testing.assert_close(out_a, out_b, atol=tol, rtol=tol)
    assert in_a.keys() == in_b.keys() and in_a
    for k in in_a:
        torch.testing.assert_close(in_a[k], in_b[k], atol=tol, rtol=tol, msg=k)
    assert par_a.keys() == par_b.keys()
    for k in par_a:
        if par_a[k] is None:
            assert par_b[k] is None, k
            continue
        torch.testing.assert_close(par_a[k], par_b[k], atol=tol, rtol=tol, msg=lambda m: f"{k}: {m}")


@needs_interp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_outputs_and_grads_through_the_kernels(family, triton_backend):
    model, inputs, expected = FAMILIES[family]()
    randomise(model)
    want = run(model, inputs, "torch")  # diffusers' own forward, unpatched
    patched = copy.deepcopy(model)
    report = patch_diffusers(patched)
    assert report.by_class() == expected, str(report)
    assert not report.skipped, str(report)
    kernels = [f"{op}_{way}" for op in ("norm_modulate", "residual_norm_modulate", "gated_residual",
                                        "sandwich_residual_norm_modulate", "sandwich_residual")
               for way in ("fwd", "bwd")]
    before = {k: LAUNCHES[k] for k in kernels}
    got = run(patched, inputs, "triton")
    ran = {k for k in kernels if LAUNCHES[k] > before[k]}
    assert {"norm_modulate_fwd", "norm_modulate_bwd"} <= ran or {"gated_residual_fwd", "gated_residual_bwd"} <= ran
    if family in ("lumina2", "mochi"):  # the sandwich seams ran through their kernels
        assert {f"sandwich_residual{op}_{way}" for op in ("", "_norm_modulate") for way in ("fwd", "bwd")} <= ran
    assert_same(got, want)
    assert patched.state_dict().keys() == model.state_dict().keys()
    assert all(type(a) is type(b) for a, b in zip(patched.modules(), model.modules()))  # classes kept


def test_probe_refuses_a_forward_it_does_not_reproduce():
    """A subclass is not the diffusers class (exact classes only); an instance whose submodule
    is another kind of norm is skipped with the reason; a block whose forward is replaced on
    the class (a different diffusers release, say) is caught by the random-weight probe."""
    model, _, _ = flux()
    model.transformer_blocks[0].norm2 = torch.nn.GroupNorm(1, 24)
    report = patch_diffusers(model, verbose=False)
    reasons = dict(report.skipped)
    assert "GroupNorm" in reasons["transformer_blocks.0"]

    block_cls = diffusers.models.transformers.transformer_flux.FluxSingleTransformerBlock
    original = block_cls.forward

    def other_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                      joint_attention_kwargs=None):
        c, x = original(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
        return c, 2 * x  # computes something else

    block_cls.forward = other_forward
    try:
        model, _, _ = flux()
        report = patch_diffusers(model, verbose=False)
    finally:
        block_cls.forward = original
    assert "single_transformer_blocks.0" in dict(report.skipped)
    assert "differs" in dict(report.skipped)["single_transformer_blocks.0"]


def test_sandwich_blocks_refuse_other_norms_and_hooked_norms():
    """A Lumina2 block whose sandwich norm is not a bias-free RMSNorm, and a Mochi block whose
    MochiModulatedRMSNorm carries a hook (the fused path never calls it), are left as they are."""
    block = lumina2()[0].layers[0]
    block.norm2 = torch.nn.LayerNorm(24)
    report = patch_diffusers(block, verbose=False)
    assert "norm2 is LayerNorm, not an RMSNorm without bias" in dict(report.skipped)["Lumina2TransformerBlock"]
    block = mochi()[0].transformer_blocks[0]
    block.norm4.register_forward_hook(lambda *args: None)
    report = patch_diffusers(block, verbose=False)
    assert "norm4 has forward hooks" in dict(report.skipped)["MochiTransformerBlock"]
    assert report.by_class() == {"MochiRMSNormZero": 2}  # its norm modules still are


def test_attention_processors_and_kwargs_pass_through():
    """The fused blocks call self.attn: a processor set after patching runs, and
    joint_attention_kwargs reach it unchanged."""
    model, inputs, _ = flux()
    randomise(model)
    want = run(model, inputs, "torch")[0]
    patch_diffusers(model)
    seen = []

    class Recording(diffusers.models.transformers.transformer_flux.FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, marker=None):
            seen.append(marker)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    model.set_attn_processor(Recording())
    with torch.no_grad():
        out = model(**inputs, joint_attention_kwargs={"marker": "m"}).sample
    assert seen == ["m", "m"]  # the double and the single block
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_pickling_keeps_the_patch():
    model, inputs, _ = dit()
    randomise(model)
    patch_diffusers(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own pickle, written just above
    block = loaded.transformer_blocks[0]
    assert isinstance(block.__dict__["forward"], FusedForward) and block.forward.module is block
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, model(**inputs).sample)


@pytest.mark.parametrize("family,backend", [("flux", "torch"), ("dit", "torch"), ("sd3", "torch"), ("wan", "torch"),
                                            pytest.param("flux", "triton", marks=needs_interp),
                                            pytest.param("lumina2", "triton", marks=needs_interp)])
def test_dynamo_traces_patched_blocks_whole_and_regional_compile_works(family, backend):
    """compile_repeated_blocks(fullgraph=True) over the patched blocks: no graph break, the same
    output; through the torch path, and through the Triton route, whose ops stay opaque
    custom-op nodes under the interpreter (compile cannot run interpreted kernels itself)."""
    model, inputs, _ = FAMILIES[family]()
    assert_regional_compile_matches(model, inputs, backend, ["BasicTransformerBlock", "JointTransformerBlock",
                                                             "Lumina2TransformerBlock", "MochiTransformerBlock"])


def assert_regional_compile_matches(model, inputs, backend, blocks):
    """Randomised, patched, ``compile_repeated_blocks(fullgraph=True)`` over the model's repeated
    blocks and ``blocks`` (class names it may not list): the unpatched eager output."""
    randomise(model)
    with torch.no_grad():
        want = model(**inputs).sample
    patch_diffusers(model)
    model._repeated_blocks = [*(model._repeated_blocks or []), *blocks]
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True, backend="eager" if backend == "torch" else "aot_eager")
    with pf_kernels.use_backend(backend), torch.no_grad(), \
            torch._functorch.config.patch(decompose_custom_triton_ops=False):
        got = model(**inputs).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_accelerate_hooks_are_refused():
    """CPU offload (accelerate's hooks, ``_hf_hook`` on a module) before the patch: refused."""
    model, _, _ = dit()
    model.transformer_blocks[0]._hf_hook = object()  # what accelerate's add_hook_to_module leaves
    with pytest.raises(ValueError, match="accelerate hook.*patch_diffusers\\(transformer\\) before"):
        patch_diffusers(model)


def _first_block_cache(model):
    from diffusers.hooks import FirstBlockCacheConfig

    model.enable_cache(FirstBlockCacheConfig(threshold=0.2))


def _group_offload(model, offload_type="block_level"):
    pytest.importorskip("accelerate")  # diffusers' group offloading moves tensors with accelerate's helpers
    kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    model.enable_group_offload(torch.device("cpu"), torch.device("cpu"), offload_type=offload_type, **kwargs)


def _layerwise_casting(model):
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)


HOOKS = {"first_block_cache": _first_block_cache, "group_offload": _group_offload,
         "group_offload_leaf": lambda model: _group_offload(model, "leaf_level"),
         "layerwise_casting": _layerwise_casting}


@pytest.mark.parametrize("hook", list(HOOKS))
def test_hooks_after_the_patch_work_and_before_it_are_refused(hook):
    model, inputs, _ = flux()
    randomise(model)
    reference = copy.deepcopy(model)
    HOOKS[hook](reference)
    with torch.no_grad(), reference.cache_context("cond"):
        want = reference(**inputs).sample

    patch_diffusers(model)
    HOOKS[hook](model)  # the hook wraps the patched forward
    with torch.no_grad(), model.cache_context("cond"):
        got = model(**inputs).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # unpatch leaves the hook in place (it wrapped the patched forward: that is switched off)
    hooked = [m for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks]
    assert unpatch_diffusers(model) == 6
    assert all(m._diffusers_hook.hooks for m in hooked)
    with torch.no_grad(), model.cache_context("cond"):
        torch.testing.assert_close(model(**inputs).sample, want, atol=1e-5, rtol=1e-5)

    late, _, _ = flux()
    HOOKS[hook](late)
    with pytest.raises(ValueError, match="before enable_cache, group offloading"):
        patch_diffusers(late)


def test_unpatch_restores_the_class_forward_and_patching_twice_is_harmless():
    model, inputs, _ = dit()
    first = patch_diffusers(model)
    assert int(first) == 4 and int(patch_diffusers(model)) == 0
    assert unpatch_diffusers(model) == 4
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_models_stay_bf16_within_a_few_ulps(family):
    """bf16 models (the torch path: the interpreter has no bf16): every patched block returns
    the dtype diffusers' own does (Wan: its bf16 stream), and the output is within a few bf16
    ulps of the unpatched model's (the fused path rounds once where eager rounds per op)."""
    model, inputs, _ = FAMILIES[family]()
    assert_bf16_like_diffusers(model, inputs)


def assert_bf16_like_diffusers(model, inputs):
    """The bf16 check of one family: its blocks' output dtypes and its output, patched (torch
    path) against unpatched."""
    randomise(model)
    model = model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
              for k, v in inputs.items()}
    blocks = [m for m in model.modules() if type(m).__name__.endswith("Block") and "Refiner" not in type(m).__name__]
    want_dtypes, got_dtypes = [], []

    def record(into):
        return lambda mod, args, out: into.append(tuple(o.dtype for o in (out if isinstance(out, tuple) else (out,))
                                                        if o is not None))

    handles = [b.register_forward_hook(record(want_dtypes)) for b in blocks]
    with torch.no_grad():
        want = model(**inputs).sample
    for h in handles:
        h.remove()
    patch_diffusers(model)
    for b in blocks:
        b.register_forward_hook(record(got_dtypes))
    with torch.no_grad(), pf_kernels.use_backend("torch"):
        got = model(**inputs).sample
    assert got_dtypes == want_dtypes and got.dtype == want.dtype == torch.bfloat16
    ulp = 2.0**-7
    torch.testing.assert_close(got.float(), want.float(), atol=8 * ulp * want.float().abs().max().item(),
                               rtol=8 * ulp)


def _norm_modules():
    from diffusers.models import normalization as nz
    from diffusers.models.transformers.transformer_mochi import MochiRMSNormZero

    gen = torch.Generator().manual_seed(11)
    d, n = 40, 5  # D not a power of two
    x = torch.randn(B, n, d, generator=gen)
    return {
        "AdaLayerNormZero": (nz.AdaLayerNormZero(d), (x,), dict(emb=torch.randn(B, d, generator=gen))),
        "AdaLayerNormContinuous-rms-affine": (nz.AdaLayerNormContinuous(d, 12, True, 1e-5, True, "rms_norm"),
                                              (x, torch.randn(B, 12, generator=gen)), {}),
        "AdaLayerNormContinuous-ln-affine": (nz.AdaLayerNormContinuous(d, 12, True, 1e-5, True),
                                             (x, torch.randn(B, 12, generator=gen)), {}),
        "SD35AdaLayerNormZeroX": (nz.SD35AdaLayerNormZeroX(d), (x,), dict(emb=torch.randn(B, d, generator=gen))),
        "LuminaRMSNormZero": (nz.LuminaRMSNormZero(d, 1e-5, True), (x,), dict(emb=torch.randn(B, d, generator=gen))),
        "MochiRMSNormZero": (MochiRMSNormZero(12, 4 * d), (x,), dict(emb=torch.randn(B, 12, generator=gen))),
    }


@needs_interp
@pytest.mark.parametrize("name", ["AdaLayerNormContinuous-rms-affine", "AdaLayerNormContinuous-ln-affine",
                                  "SD35AdaLayerNormZeroX", "LuminaRMSNormZero", "MochiRMSNormZero"])
def test_norm_modules_alone(name, triton_backend):
    """Each norm module with random (affine) weights, D = 40: outputs, input and parameter
    grads the same patched (kernels) as its own forward."""
    module, args, kwargs = _norm_modules()[name]
    randomise(module, seed=3)
    patched = copy.deepcopy(module)
    assert int(patch_diffusers(patched)) == 1

    def grads(m, backend):
        m.zero_grad(set_to_none=True)
        x = args[0].clone().requires_grad_()
        with pf_kernels.use_backend(backend):
            outs = m(x, *args[1:], **kwargs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i))).sum()
            for i, o in enumerate(outs)).backward()
        return [o.detach() for o in outs], x.grad, [p.grad for p in m.parameters()]

    want, got = grads(module, "torch"), grads(patched, "triton")
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
