"""diffusers' DiT-family transformers, one forward: diffusers' own code against ``patch_diffusers``.

Variants (``extra_info["impl"]``, so ``scripts/bench_table.py`` gives "x eager" and "x compile"):
  ``eager``          the unpatched transformer (diffusers' eager code);
  ``fused``          patched: the ``pf_kernels`` Triton ops on the modulation/residual path;
  ``compile``        unpatched, ``compile_repeated_blocks(fullgraph=True)`` (diffusers' regional
                     compile: one compile per block class, what its docs recommend);
  ``fused+compile``  patched, then the same regional compile (the custom ops stay in the graph).
Families: DiT, PixArt, SD3, Flux, HunyuanVideo (and its token replace), Wan, LTX-Video,
QwenImage (with and without ``zero_cond_t``), Lumina2, Mochi. Each at ``medium`` size (random weights, bf16, batch 2, about 1024 image and 128 text
tokens, hidden 1152 to 1536, 2 blocks of each kind: the per-block costs at a realistic width
and token count, not a whole model) and ``tiny`` (the test suite's widths: launch-bound, where
fewer kernels count most). Before timing, the patched output is compared with the unpatched
one (``max_rel_err`` in extra_info; bf16 rounds once where eager rounds per op).

    PYTHONPATH=. python -m pytest benchmarks/bench_diffusers.py --benchmark-only [-k flux]
    PF_BENCH_SCOPE=quick ...   # medium only; the compiled variants for three families

Needs CUDA (the cases skip without it) and diffusers (the module skips without it: the lent
GPU image lacks it, so carry its wheel, see BENCHMARKS.md). On the CPU only
``test_diffusers_forward_cpu_tiny`` runs: the tiny configs through the torch path, which keeps
the builders and inputs exercised and measures nothing about the GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pf_kernels
from conftest import CUDA, QUICK

diffusers = pytest.importorskip("diffusers")

B = 2


def _dit(s):
    heads, image = (16, 64) if s == "medium" else (2, 4)  # 1152 wide, 32 x 32 patches
    model = diffusers.DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=72 if s == "medium" else 12,
                                            in_channels=4, num_layers=2, sample_size=image, patch_size=2,
                                            num_embeds_ada_norm=1000)
    return model, dict(hidden_states=torch.randn(B, 4, image, image), timestep=torch.tensor([3, 801]),
                       class_labels=torch.tensor([1, 7]))


def _pixart(s):
    heads, dh, image, text = (16, 72, 64, 128) if s == "medium" else (2, 12, 4, 5)
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=dh, in_channels=4,
                                               out_channels=8, num_layers=2, sample_size=image, patch_size=2,
                                               cross_attention_dim=heads * dh, caption_channels=64)
    return model, dict(hidden_states=torch.randn(B, 4, image, image), encoder_hidden_states=torch.randn(B, text, 64),
                       timestep=torch.tensor([3, 801]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _sd3(s):
    heads, dh, image, text = (24, 64, 64, 128) if s == "medium" else (3, 8, 4, 5)
    model = diffusers.SD3Transformer2DModel(sample_size=image, patch_size=2, in_channels=16, num_layers=2,
                                            attention_head_dim=dh, num_attention_heads=heads, joint_attention_dim=64,
                                            caption_projection_dim=heads * dh, pooled_projection_dim=32,
                                            out_channels=16, pos_embed_max_size=image // 2)
    return model, dict(hidden_states=torch.randn(B, 16, image, image), encoder_hidden_states=torch.randn(B, text, 64),
                       pooled_projections=torch.randn(B, 32), timestep=torch.tensor([3.0, 801.0]))


def _dims(s):
    """(heads, head dim, image tokens, text tokens, rope axes) of the MMDiT-style families."""
    return (12, 128, 1024, 128, (16, 56, 56)) if s == "medium" else (3, 8, 6, 5, (2, 2, 4))


def _flux(s):
    heads, dh, n, t, axes = _dims(s)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                             attention_head_dim=dh, num_attention_heads=heads, joint_attention_dim=64,
                                             pooled_projection_dim=32, axes_dims_rope=axes)
    return model, dict(hidden_states=torch.randn(B, n, 64), encoder_hidden_states=torch.randn(B, t, 64),
                       pooled_projections=torch.randn(B, 32), timestep=torch.tensor([0.3, 0.9]),
                       img_ids=torch.randint(0, 32, (n, 3)).float(), txt_ids=torch.zeros(t, 3))


def _video(s):
    """(frames, height, width) of the video latents, patched 1 x 2 x 2: 1024 tokens, or 12."""
    return (4, 32, 32) if s == "medium" else (2, 4, 6)


def _hunyuan_video(s, token_replace=False):
    heads, dh, _, t, _ = _dims(s)
    if s == "tiny":
        heads, dh = 2, 12  # its rope axes (2, 4, 6) fill a head of 12
    f, h, w = _video(s)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=heads, attention_head_dim=dh, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, text_embed_dim=64, pooled_projection_dim=32,
        rope_axes_dim=(16, 56, 56) if s == "medium" else (2, 4, 6), guidance_embeds=False,
        image_condition_type="token_replace" if token_replace else None)
    return model, dict(hidden_states=torch.randn(B, 16, f, h, w), timestep=torch.tensor([3, 801]),
                       encoder_hidden_states=torch.randn(B, t, 64), encoder_attention_mask=torch.ones(B, t),
                       pooled_projections=torch.randn(B, 32))


def _wan(s):
    heads, dh, _, t, _ = _dims(s)
    f, h, w = _video(s)
    model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dh,
                                            in_channels=16, out_channels=16, text_dim=64, freq_dim=256,
                                            ffn_dim=4 * heads * dh, num_layers=2, cross_attn_norm=True,
                                            rope_max_seq_len=1024)
    return model, dict(hidden_states=torch.randn(B, 16, f, h, w), timestep=torch.tensor([3, 801]),
                       encoder_hidden_states=torch.randn(B, t, 64))


def _ltx(s):
    heads, dh, n, t, _ = _dims(s)
    f, h, w = (4, 16, 16) if s == "medium" else (1, 2, 3)
    model = diffusers.LTXVideoTransformer3DModel(in_channels=128, out_channels=128, num_attention_heads=heads,
                                                 attention_head_dim=dh, cross_attention_dim=heads * dh, num_layers=2,
                                                 caption_channels=64)
    return model, dict(hidden_states=torch.randn(B, f * h * w, 128), encoder_hidden_states=torch.randn(B, t, 64),
                       timestep=(1000 * torch.rand(B, f * h * w)).round(), encoder_attention_mask=torch.ones(B, t),
                       num_frames=f, height=h, width=w)


def _qwen_image(s, zero_cond_t=False):
    heads, dh, _, t, axes = _dims(s)
    # zero_cond_t: a noisy image, then a condition image (its tokens read the t = 0 modulation)
    if s == "medium":
        shapes = [(1, 24, 32), (1, 8, 32)] if zero_cond_t else [(1, 32, 32)]
    else:
        shapes = [(1, 2, 2), (1, 1, 2)] if zero_cond_t else [(1, 2, 3)]
    n = sum(f * h * w for f, h, w in shapes)
    model = diffusers.QwenImageTransformer2DModel(patch_size=1, in_channels=64, out_channels=16, num_layers=2,
                                                  attention_head_dim=dh, num_attention_heads=heads,
                                                  joint_attention_dim=64, axes_dims_rope=axes, zero_cond_t=zero_cond_t)
    return model, dict(hidden_states=torch.randn(B, n, 64), encoder_hidden_states=torch.randn(B, t, 64),
                       encoder_hidden_states_mask=torch.ones(B, t), timestep=torch.tensor([0.3, 0.9]),
                       img_shapes=[shapes] * B)


def _lumina2(s):
    hidden, heads, kv, axes, image, t = (1536, 12, 4, (32, 48, 48), 64, 128) if s == "medium" else \
        (24, 2, 1, (4, 4, 4), 4, 5)
    model = diffusers.Lumina2Transformer2DModel(sample_size=image, patch_size=2, in_channels=4, hidden_size=hidden,
                                                num_layers=2, num_refiner_layers=1, num_attention_heads=heads,
                                                num_kv_heads=kv, multiple_of=16, axes_dim_rope=axes,
                                                axes_lens=(300, 512, 512), cap_feat_dim=64)
    return model, dict(hidden_states=torch.randn(B, 4, image, image), timestep=torch.tensor([0.3, 0.9]),
                       encoder_hidden_states=torch.randn(B, t, 64),
                       encoder_attention_mask=torch.ones(B, t, dtype=torch.bool))


def _mochi(s):
    heads, dh, _, t, _ = _dims(s)
    if s == "tiny":
        heads, dh = 2, 12
    f, h, w = _video(s)
    model = diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=heads, attention_head_dim=dh,
                                              num_layers=2, pooled_projection_dim=64, in_channels=16,
                                              text_embed_dim=64, time_embed_dim=256 if s == "medium" else 8,
                                              max_sequence_length=t)
    return model, dict(hidden_states=torch.randn(B, 16, f, h, w), timestep=torch.tensor([3, 801]),
                       encoder_hidden_states=torch.randn(B, t, 64),
                       encoder_attention_mask=torch.ones(B, t, dtype=torch.bool))


FAMILIES = {
    "dit": _dit, "pixart": _pixart, "sd3": _sd3, "flux": _flux, "hunyuan_video": _hunyuan_video,
    "hunyuan_video_token_replace": lambda s: _hunyuan_video(s, token_replace=True), "wan": _wan, "ltx": _ltx,
    "qwen_image": _qwen_image, "qwen_image_zero_cond_t": lambda s: _qwen_image(s, zero_cond_t=True),
    "lumina2": _lumina2, "mochi": _mochi,
}
VARIANTS = ["eager", "fused", "compile", "fused+compile"]
COMPILED_IN_QUICK = ("flux", "wan", "qwen_image_zero_cond_t")


def _cases():
    sizes = ["medium"] if QUICK else ["medium", "tiny"]
    for size in sizes:
        for family in FAMILIES:
            for variant in VARIANTS:
                if QUICK and "compile" in variant and family not in COMPILED_IN_QUICK:
                    continue
                yield size, family, variant


def build(family: str, size: str, device: str, dtype: torch.dtype):
    """(model, inputs) on ``device`` in ``dtype``, every parameter random (seeded)."""
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs (a medium model initialised on the host takes seconds)
        model, inputs = FAMILIES[family](size)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised gates would leave the modulation path idle
            p.copy_(torch.randn_like(p) / (p.shape[-1] if p.dim() > 1 else 4) ** 0.5)
    if dtype != torch.float32:
        keep = getattr(model, "_keep_in_fp32_modules", None) or []  # Wan's norms and tables, as from_pretrained keeps
        model = model.to(dtype)
        for name, p in model.named_parameters():
            if any(k in name.split(".") for k in keep):
                p.data = p.data.float()
    model = model.eval()
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
              for k, v in inputs.items()}
    return model, inputs


def prepare(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """The model as the variant runs it (a patched copy for the fused variants)."""
    if variant.startswith("fused"):
        model = copy.deepcopy(model)
        pf_kernels.patch_diffusers(model, verbose=False)
    if variant.endswith("compile"):
        # every block class: DiT/PixArt list none, HunyuanVideo's list lacks its token-replace blocks
        blocks = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Block")}
        model._repeated_blocks = sorted(set(model._repeated_blocks or []) | blocks)
        model.compile_repeated_blocks(fullgraph=True)
    return model


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


@pytest.mark.skipif(not CUDA, reason="timing diffusers' transformers needs CUDA")
@pytest.mark.parametrize("size,family,variant", list(_cases()))
def test_diffusers_forward_cuda(benchmark, time_ms, size, family, variant):
    torch._dynamo.reset()
    model, inputs = build(family, size, "cuda", torch.bfloat16)
    with torch.no_grad():
        want = model(**inputs).sample
        run_model = prepare(model, variant)
        got = run_model(**inputs).sample  # (the first call compiles)

        def forward():
            return run_model(**inputs)

        ms = time_ms(forward)
        benchmark.pedantic(lambda: (forward(), torch.cuda.synchronize()), rounds=10, iterations=1, warmup_rounds=1)
    benchmark.group = f"diffusers {family} {size} fwd bf16 b{B}"
    benchmark.extra_info.update(impl=variant, ms=round(ms, 5), device=torch.cuda.get_device_name(),
                                max_rel_err=round(_max_rel_err(got, want), 5),
                                params=sum(p.numel() for p in model.parameters()))
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", ["eager", "fused"])
def test_diffusers_forward_cpu_tiny(benchmark, variant):
    """The CPU keeps the tiny builders exercised (the fused variant through the torch path)."""
    model, inputs = build("qwen_image_zero_cond_t", "tiny", "cpu", torch.float32)
    run_model = prepare(model, variant)
    with torch.no_grad():
        out = benchmark.pedantic(lambda: run_model(**inputs), rounds=3, iterations=1, warmup_rounds=1)
        torch.testing.assert_close(out.sample, model(**inputs).sample, atol=1e-5, rtol=1e-5)
    benchmark.group = "diffusers qwen_image_zero_cond_t tiny fwd fp32 cpu"
    benchmark.extra_info.update(impl=variant, device="cpu")
