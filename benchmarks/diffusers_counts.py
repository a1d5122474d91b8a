"""Kernels and memory passes per block of diffusers' transformers, with and without patch_diffusers.

Counted on the CPU in eager mode (no GPU, no timing): a ``TorchDispatchMode`` sees every op a
block's forward runs, on the modulation/residual path only, i.e. outside the block's attention,
feed-forward, projections and embeddings (ops inside any submodule that is not a norm module are
not counted; the norm modules' own Linear/SiLU, the modulation projection, neither). For each
op that is not a view: one kernel, and one memory pass for each activation-sized tensor
((B, N, D) or larger) it reads or writes. Patched, the fused ops are the ``pf_kernels`` custom
ops (Triton kernels, run by the interpreter here: ``TRITON_INTERPRET=1`` is set below), each
one kernel; the O(B * D) folds of an affine norm's weight into the modulation count as kernels
with no pass, and so do the few small ops that build an indexed block's (B, N) row index. The
indexed ops' bound check of that index (``min``/``max``, on CPU tensors only) is not counted.

    PYTHONPATH=. .venv/bin/python benchmarks/diffusers_counts.py [--json OUT.json]

The models are tiny random configs (hidden 24 to 48, batch 2): the counts depend on a block's
code, not its size.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before pf_kernels: the fused ops run on CPU tensors

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import pf_kernels  # noqa: E402

NORM_CLASSES = ("AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous", "SD35AdaLayerNormZeroX",
                "CogVideoXLayerNormZero", "LayerNorm", "FP32LayerNorm", "RMSNorm", "Identity",
                "HunyuanVideoTokenReplaceAdaLayerNormZero", "HunyuanVideoTokenReplaceAdaLayerNormZeroSingle",
                "LuminaRMSNormZero", "MochiRMSNormZero", "MochiModulatedRMSNorm", "MochiLayerNormContinuous")


class PathCounter(TorchDispatchMode):
    """Counts kernels and activation-sized passes of the ops run while ``depth`` is 0."""

    def __init__(self, act_numel: int):
        super().__init__()
        self.act_numel, self.depth = act_numel, 0
        self.kernels, self.passes, self.ops = 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t)]
        host_check = func.overloadpacket.__name__ in ("min", "max") and not args[0].is_floating_point()
        # no tensor out (promote_types...): no kernel; an index's bound check runs on CPU tensors only
        if self.depth == 0 and outs and not func.is_view and not host_check:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if torch.is_tensor(t)]
            self.kernels += 1
            self.passes += sum(t.numel() >= self.act_numel for t in tensors)
            self.ops.append(str(func.overloadpacket.__name__))
        return out


def exclude_submodules(block, counter):
    """Hooks that stop the count inside every submodule that is not a norm module (and inside
    a norm module's own Linear/SiLU)."""
    handles = []

    def enter(*_):
        counter.depth += 1

    def leave(*_):
        counter.depth -= 1

    for name, sub in block.named_modules():
        if not name:
            continue
        if type(sub).__name__ in NORM_CLASSES and type(sub).__name__ != "Identity":
            continue
        handles.append(sub.register_forward_pre_hook(enter))
        handles.append(sub.register_forward_hook(leave))
    return handles


def count_block(block, args, kwargs, act_numel, backend):
    counter = PathCounter(act_numel)
    handles = exclude_submodules(block, counter)
    try:
        with torch.no_grad(), pf_kernels.use_backend(backend), counter:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return counter


def cases():
    """(name, block, args, kwargs, activation numel): one block of each family, tiny and random."""
    import diffusers
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from diffusers.models.transformers.transformer_hunyuan_video import (
        HunyuanVideoTokenReplaceSingleTransformerBlock,
        HunyuanVideoTokenReplaceTransformerBlock,
    )
    from diffusers.models.transformers.transformer_ltx import LTXVideoTransformerBlock
    from diffusers.models.transformers.transformer_lumina2 import Lumina2TransformerBlock
    from diffusers.models.transformers.transformer_mochi import MochiTransformerBlock
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    gen = torch.Generator().manual_seed(0)
    b, n, t, d = 2, 16, 8, 48

    def rand(*shape):
        return torch.randn(shape, generator=gen)

    dit = BasicTransformerBlock(d, 2, d // 2, norm_type="ada_norm_zero", num_embeds_ada_norm=10,
                                norm_elementwise_affine=False, activation_fn="gelu-approximate")
    yield "DiT (BasicTransformerBlock, ada_norm_zero)", dit, (rand(b, n, d),), dict(
        timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 2])), b * n * d
    pixart = BasicTransformerBlock(d, 2, d // 2, cross_attention_dim=d, norm_type="ada_norm_single",
                                   norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate")
    yield "PixArt (BasicTransformerBlock, ada_norm_single)", pixart, (rand(b, n, d),), dict(
        encoder_hidden_states=rand(b, t, d), timestep=rand(b, 6 * d)), b * n * d
    sana = SanaTransformerBlock(d, 2, d // 2, num_cross_attention_heads=2, cross_attention_head_dim=d // 2,
                                cross_attention_dim=d)
    yield "Sana (SanaTransformerBlock)", sana, (rand(b, n, d),), dict(
        encoder_hidden_states=rand(b, t, d), timestep=rand(b, 6 * d), height=4, width=4), b * n * d
    sd3 = diffusers.models.attention.JointTransformerBlock(d, 2, d // 2, context_pre_only=False)
    yield "SD3 (JointTransformerBlock)", sd3, (rand(b, n, d), rand(b, t, d), rand(b, d)), {}, b * t * d
    flux_double = FluxTransformerBlock(d, 2, d // 2)
    yield "Flux double (FluxTransformerBlock)", flux_double, (rand(b, n, d), rand(b, t, d), rand(b, d)), {}, b * t * d
    flux_single = FluxSingleTransformerBlock(d, 2, d // 2)
    yield "Flux single (FluxSingleTransformerBlock)", flux_single, (rand(b, n, d), rand(b, t, d), rand(b, d)), {}, \
        b * n * d
    ltx = LTXVideoTransformerBlock(d, 2, d // 2, cross_attention_dim=d)
    yield "LTX-Video (LTXVideoTransformerBlock, per-token modulation)", ltx, (rand(b, n, d), rand(b, t, d),
                                                                             rand(b, n, 6 * d)), {}, b * n * d
    # the indexed K = 2 forms: QwenImage's zero_cond_t (the last 6 tokens a condition image's,
    # temb (2B, D)) and its plain per-sample path; HunyuanVideo's token replace (the first 6 tokens)
    for zero_cond_t in (True, False):
        qwen = QwenImageTransformerBlock(d, 2, d // 2, zero_cond_t=zero_cond_t)
        index = torch.tensor([[0] * (n - 6) + [1] * 6] * b) if zero_cond_t else None
        yield f"QwenImage (QwenImageTransformerBlock{', zero_cond_t: K = 2' if zero_cond_t else ''})", qwen, (
            rand(b, n, d), rand(b, t, d), None, rand(2 * b if zero_cond_t else b, d)), dict(
            modulate_index=index), b * t * d
    replace = dict(token_replace_emb=rand(b, d), num_tokens=6)
    yield "HunyuanVideo token replace (HunyuanVideoTokenReplaceTransformerBlock, K = 2)", \
        HunyuanVideoTokenReplaceTransformerBlock(2, d // 2, 4.0), (rand(b, n, d), rand(b, t, d), rand(b, d)), replace, \
        b * t * d
    yield "HunyuanVideo token replace single (HunyuanVideoTokenReplaceSingleTransformerBlock, K = 2)", \
        HunyuanVideoTokenReplaceSingleTransformerBlock(2, d // 2), (rand(b, n, d), rand(b, t, d), rand(b, d)), \
        replace, b * n * d
    lumina2 = Lumina2TransformerBlock(d, 2, 1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5)
    yield "Lumina2 (Lumina2TransformerBlock)", lumina2, (rand(b, n, d), None, None, rand(b, d)), {}, b * n * d
    mochi = MochiTransformerBlock(d, 2, d // 2, pooled_projection_dim=32)
    yield "Mochi (MochiTransformerBlock)", mochi, (rand(b, n, d), rand(b, t, 32), rand(b, d),
                                                    torch.ones(b, t, dtype=torch.bool)), {}, b * t * 32
    wan = WanTransformerBlock(d, 2 * d, 2, cross_attn_norm=True)
    yield "Wan (WanTransformerBlock, cross_attn_norm), fp32", wan, (
        rand(b, n, d), rand(b, t, d), rand(b, 6, d), None), {}, b * n * d
    # Wan keeps a half-precision stream and modulates in fp32: its casts are kernels and passes
    # too (fp16 here: the interpreter has no bf16; a bf16 stream runs the same code)
    half = copy.deepcopy(wan).half()
    yield "Wan (WanTransformerBlock, cross_attn_norm), fp16 stream", half, (
        rand(b, n, d).half(), rand(b, t, d).half(), rand(b, 6, d).half(), None), {}, b * n * d


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the rows here as well")
    parser.add_argument("--ops", action="store_true", help="list the counted ops of each block")
    opts = parser.parse_args(argv)
    rows = []
    for name, block, args, kwargs, act in cases():
        block = block.eval()
        eager = count_block(block, args, kwargs, act, "torch")
        patched = copy.deepcopy(block)
        report = pf_kernels.patch_diffusers(patched, verbose=False)
        fused = count_block(patched, args, kwargs, act, "triton")
        rows.append(dict(block=name, patched=report.by_class(), eager_kernels=eager.kernels,
                         fused_kernels=fused.kernels, eager_passes=eager.passes, fused_passes=fused.passes))
        if opts.ops:
            print(name, "\n  eager:", " ".join(eager.ops), "\n  fused:", " ".join(fused.ops))
    print("| block | kernels eager -> fused | memory passes eager -> fused |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['block']} | {r['eager_kernels']} -> {r['fused_kernels']} | "
              f"{r['eager_passes']} -> {r['fused_passes']} |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
