"""Drop-in for diffusers' DiT-family transformers: rebind instance forwards to the fused ops.

``patch_diffusers(transformer)`` finds modules by their exact diffusers class:
  norm modules  ``AdaLayerNormZero``, ``AdaLayerNormZeroSingle``, ``AdaLayerNormContinuous``
                (chunks in the order scale, shift), ``SD35AdaLayerNormZeroX`` (one norm, two
                modulations), ``CogVideoXLayerNormZero`` (an affine LayerNorm over both streams),
                ``LuminaRMSNormZero`` / ``MochiRMSNormZero`` (RMSNorm, scale only):
                LN/RMS + modulation in one ``norm_modulate`` pass;
  blocks        ``BasicTransformerBlock`` with ``ada_norm_zero`` (DiT) or ``ada_norm_single``
                (PixArt's ``scale_shift_table``), ``SanaTransformerBlock``, SD3's
                ``JointTransformerBlock``, ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``,
                ``HunyuanVideoTransformerBlock`` / ``HunyuanVideoSingleTransformerBlock``,
                ``WanTransformerBlock`` (its bf16 stream kept while it modulates in fp32) and
                ``LTXVideoTransformerBlock`` (RMSNorm with a shift, per-token modulation): each
                residual update fused with the next norm and modulation
                (``residual_norm_modulate``), the last one a single ``residual`` pass;
  indexed blocks ``QwenImageTransformerBlock`` (``zero_cond_t``: condition tokens read the t = 0
                modulation) and ``HunyuanVideoTokenReplaceTransformerBlock`` /
                ``...SingleTransformerBlock`` (the first frame's tokens their own): two
                modulations as (B, 2, D) tables, a (B, N) index choosing each token's row
                (the ``*_indexed`` ops, K = 2), and their norm modules
                ``HunyuanVideoTokenReplaceAdaLayerNormZero`` / ``...Single`` called on their own;
  sandwich      ``Lumina2TransformerBlock`` / ``MochiTransformerBlock``: the RMSNorm sandwich
                ``x + tanh(g) * RMS_w(y)`` fused with the next ``RMS_w'(x) * (1 + s)``
                (``sandwich_residual_norm_modulate``), the last update ``sandwich_residual``.
Each module keeps its class (diffusers matches blocks by class name: ``compile_repeated_blocks``,
``_no_split_modules``, its cache hooks' block registry); only the instance's ``forward`` changes.
The fused block forwards call ``self.attn``/``self.attn1``/``self.ff``... through the modules,
with the attention kwargs (``cross_attention_kwargs``, ``joint_attention_kwargs``: IP-adapter
inputs, LoRA scales), chunked feed-forward and fp16 clipping passed through as the block does,
so attention processors, LoRA layers and attention backends keep working.

A module is patched only when the fused forward reproduces its own on a copy with random
weights (every parameter redrawn: zero-initialised gates would hide a wrong term) and a small
random probe; the others are left as they are and listed in the report with the reason.

Order with diffusers' and accelerate's hooks (``enable_cache``, group offloading, layerwise
casting, CPU offload): they wrap the forward they find when they register, so patch first. A
transformer that already carries such hooks is refused with a ValueError saying so.
``unpatch_diffusers`` restores the forwards; where a hook wrapped the patched forward later, the
hook stays and the patched forward is switched off underneath it (it then runs the module's own).
"""

from __future__ import annotations

import copy
import importlib
import warnings

import torch
import torch.nn as nn

from pf_kernels.dispatch import (
    adaln_modulate_indexed,
    gated_residual_indexed,
    gated_residual_modulate_indexed,
    norm_modulate,
    residual,
    residual_norm_modulate,
    sandwich_residual,
    sandwich_residual_norm_modulate,
)
from pf_kernels.patch import PatchReport

_MARK = "_pf_kernels_diffusers_forward"  # the FusedForward a patched module carries


#################################################################################
#                                Norm helpers                                   #
#################################################################################


def _norm_spec(norm: nn.Module):
    """(rms, weight, bias, eps) of a LayerNorm / FP32LayerNorm / diffusers RMSNorm over the last
    dim, or None for anything else (another norm, or one with several dims)."""
    from diffusers.models.normalization import FP32LayerNorm, RMSNorm  # optional dependency

    if type(norm) in (nn.LayerNorm, FP32LayerNorm) and len(norm.normalized_shape) == 1:
        return False, norm.weight, norm.bias, norm.eps
    if type(norm) is RMSNorm and len(norm.dim) == 1:
        return True, norm.weight, norm.bias, norm.eps
    return None


def _mod(norm: nn.Module, x: torch.Tensor, shift, scale, out_dtype=None) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in one pass; shift, scale (B, 1, D) or None."""
    rms, weight, bias, eps = _norm_spec(norm)
    return norm_modulate(x, shift, scale, weight=weight, bias=bias, rms=rms, eps=eps, out_dtype=out_dtype)


def _res_mod(norm: nn.Module, x, gate, y, shift=None, scale=None):
    """``x_new = x + gate * y`` (``x + y`` without gate), ``h = norm(x_new) * (1 + scale) + shift``."""
    rms, weight, bias, eps = _norm_spec(norm)
    return residual_norm_modulate(x, gate, y, shift, scale, weight=weight, bias=bias, rms=rms, eps=eps)


#################################################################################
#                           Fused norm-module forwards                          #
#################################################################################


def _ada_layer_norm_zero(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))  # (B, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    return _mod(self.norm, x, shift_msa[:, None], scale_msa[:, None]), gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ada_layer_norm_zero_single(self, x, emb=None):
    shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)  # (B, D) each
    return _mod(self.norm, x, shift_msa[:, None], scale_msa[:, None]), gate_msa


def _ada_layer_norm_continuous(self, x, conditioning_embedding):
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)  # scale first: this class's order
    return _mod(self.norm, x, shift[:, None, :], scale[:, None, :])


def _sd35_ada_layer_norm_zero_x(self, hidden_states, emb=None):
    emb = self.linear(self.silu(emb))  # (B, 9D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = emb.chunk(
        9, dim=1)
    h = _mod(self.norm, hidden_states, shift_msa[:, None], scale_msa[:, None])
    h2 = _mod(self.norm, hidden_states, shift_msa2[:, None], scale_msa2[:, None])
    return h, gate_msa, shift_mlp, scale_mlp, gate_mlp, h2, gate_msa2


def _cogvideox_layer_norm_zero(self, hidden_states, encoder_hidden_states, temb):
    shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(self.silu(temb)).chunk(6, dim=1)
    hidden_states = _mod(self.norm, hidden_states, shift[:, None, :], scale[:, None, :])
    encoder_hidden_states = _mod(self.norm, encoder_hidden_states, enc_shift[:, None, :], enc_scale[:, None, :])
    return hidden_states, encoder_hidden_states, gate[:, None, :], enc_gate[:, None, :]


def _lumina_rms_norm_zero(self, x, emb=None):
    scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(4, dim=1)
    return _mod(self.norm, x, None, scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp


def _mochi_rms_norm_zero(self, hidden_states, emb):
    scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(4, dim=1)
    rms, weight, bias, eps = _norm_spec(self.norm)  # computed in fp32, returned in the stream's dtype
    h = norm_modulate(hidden_states, None, scale_msa[:, None], weight=weight, bias=bias, rms=rms, eps=eps,
                      out_dtype=hidden_states.dtype)
    return h, gate_msa, scale_mlp, gate_mlp


#################################################################################
#                              Fused block forwards                             #
#################################################################################


def _basic_block(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                 timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
    """BasicTransformerBlock, ``ada_norm_zero`` (DiT) or ``ada_norm_single`` (PixArt), no
    positional embedding: the seams attention -> (cross-attention ->) feed-forward fused."""
    kwargs = dict(cross_attention_kwargs) if cross_attention_kwargs is not None else {}
    if hidden_states.dim() != 3 or kwargs.get("gligen") is not None or kwargs.get("scale") is not None:
        # GLIGEN's fuser, a deprecated scale (it warns), a 4-D stream: the block's own forward
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    kwargs.pop("gligen", None)
    x = hidden_states  # (B, N, D)
    if self.norm_type == "ada_norm_zero":
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, timestep, class_labels, hidden_dtype=x.dtype)
        gate_msa, shift_mlp, scale_mlp, gate_mlp = (t[:, None] for t in (gate_msa, shift_mlp, scale_mlp, gate_mlp))
        norm_ff = self.norm3
    else:  # ada_norm_single: (B, 1, D) rows of scale_shift_table + t
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)
        h = _mod(self.norm1, x, shift_msa, scale_msa)
        norm_ff = self.norm2
    attn = self.attn1(h, encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                      attention_mask=attention_mask, **kwargs)
    if self.attn2 is not None:
        if self.norm_type == "ada_norm_zero":
            x, h = _res_mod(self.norm2, x, gate_msa, attn)
        else:  # PixArt's cross-attention reads the raw stream
            x = h = residual(x, gate_msa, attn)
        attn = self.attn2(h, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                          **kwargs)
        x, h = _res_mod(norm_ff, x, None, attn, shift_mlp, scale_mlp)
    else:
        x, h = _res_mod(norm_ff, x, gate_msa, attn, shift_mlp, scale_mlp)
    return residual(x, gate_mlp, _feed_forward(self, self.ff, h))


def _feed_forward(block, ff, h):
    """``ff(h)``, in chunks when the block was set to (``set_chunk_feed_forward``)."""
    if block._chunk_size is not None:
        from diffusers.models.attention import _chunked_feed_forward  # optional dependency

        return _chunked_feed_forward(ff, h, block._chunk_dim, block._chunk_size)
    return ff(h)


def _joint_block(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    """SD3's JointTransformerBlock (SD3.5's dual attention, the last block's context_pre_only)."""
    kwargs = joint_attention_kwargs or {}
    if self.use_dual_attention:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp, h2, gate_msa2 = self.norm1(hidden_states, emb=temb)
    else:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    if self.context_pre_only:
        hc = self.norm1_context(encoder_hidden_states, temb)
    else:
        hc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
    attn, context_attn = self.attn(hidden_states=h, encoder_hidden_states=hc, **kwargs)
    if self.use_dual_attention:
        x = residual(hidden_states, gate_msa[:, None], attn)
        attn = self.attn2(hidden_states=h2, **kwargs)
        x, h = _res_mod(self.norm2, x, gate_msa2[:, None], attn, shift_mlp[:, None], scale_mlp[:, None])
    else:
        x, h = _res_mod(self.norm2, hidden_states, gate_msa[:, None], attn, shift_mlp[:, None], scale_mlp[:, None])
    x = residual(x, gate_mlp[:, None], _feed_forward(self, self.ff, h))
    if self.context_pre_only:
        return None, x
    c, hc = _res_mod(self.norm2_context, encoder_hidden_states, c_gate_msa[:, None], context_attn,
                     c_shift_mlp[:, None], c_scale_mlp[:, None])
    return residual(c, c_gate_mlp[:, None], _feed_forward(self, self.ff_context, hc)), x


def _flux_double_block(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                       joint_attention_kwargs=None):
    h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    hc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
    outputs = self.attn(hidden_states=h, encoder_hidden_states=hc, image_rotary_emb=image_rotary_emb,
                        **(joint_attention_kwargs or {}))
    attn, context_attn = outputs[0], outputs[1]
    # image stream: residual + norm2 + modulation in one pass, then the MLP's residual
    x, h = _res_mod(self.norm2, hidden_states, gate_msa[:, None], attn, shift_mlp[:, None], scale_mlp[:, None])
    x = residual(x, gate_mlp[:, None], self.ff(h))
    if len(outputs) == 3:  # IP-adapter output
        x = x + outputs[2]
    c, hc = _res_mod(self.norm2_context, encoder_hidden_states, c_gate_msa[:, None], context_attn,
                     c_shift_mlp[:, None], c_scale_mlp[:, None])
    c = residual(c, c_gate_mlp[:, None], self.ff_context(hc))
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    return c, x


def _flux_single_block(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                       joint_attention_kwargs=None):
    text_seq_len = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, T + N, D)
    h, gate = self.norm(x, emb=temb)
    mlp = self.act_mlp(self.proj_mlp(h))
    attn = self.attn(hidden_states=h, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    x = residual(x, gate[:, None], self.proj_out(torch.cat([attn, mlp], dim=2)))
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :text_seq_len], x[:, text_seq_len:]


def _wan_block(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """WanTransformerBlock: the stream keeps its dtype (bf16) while modulations and residual
    updates are fp32 (``out_dtype``); the ungated cross-attention residual and norm3 fused."""
    if temb.ndim == 4:  # (B, N, 6, D): Wan 2.2 TI2V's per-token modulation, (B, N, D) strided rows
        mods = [t.squeeze(2) for t in (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    else:  # (B, 6, D): (B, 1, D) each
        mods = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods
    dtype = hidden_states.dtype
    h = norm_modulate(hidden_states, shift_msa, scale_msa, eps=self.norm1.eps, out_dtype=dtype)
    attn = self.attn1(h, None, None, rotary_emb)
    if isinstance(self.norm2, nn.Identity):
        x = h = residual(hidden_states, gate_msa, attn, out_dtype=dtype)
    else:  # cross_attn_norm: an affine fp32 LayerNorm without modulation
        rms, weight, bias, eps = _norm_spec(self.norm2)
        x, h = residual_norm_modulate(hidden_states, gate_msa, attn, weight=weight, bias=bias, rms=rms, eps=eps,
                                      out_dtype=dtype)
    attn = self.attn2(h, encoder_hidden_states, None, None)
    x, h = residual_norm_modulate(x, None, attn, c_shift_msa, c_scale_msa, eps=self.norm3.eps, out_dtype=dtype)
    return residual(x, c_gate_msa, self.ffn(h), out_dtype=dtype)


def _hunyuan_video_block(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, freqs_cis=None, *args,
                         **kwargs):
    """HunyuanVideoTransformerBlock: Flux's double block without IP-adapter or fp16 clipping."""
    h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    hc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
    attn, context_attn = self.attn(hidden_states=h, encoder_hidden_states=hc, attention_mask=attention_mask,
                                   image_rotary_emb=freqs_cis)
    x, h = _res_mod(self.norm2, hidden_states, gate_msa[:, None], attn, shift_mlp[:, None], scale_mlp[:, None])
    c, hc = _res_mod(self.norm2_context, encoder_hidden_states, c_gate_msa[:, None], context_attn,
                     c_shift_mlp[:, None], c_scale_mlp[:, None])
    return residual(x, gate_mlp[:, None], self.ff(h)), residual(c, c_gate_mlp[:, None], self.ff_context(hc))


def _hunyuan_video_single_block(self, hidden_states, encoder_hidden_states, temb, attention_mask=None,
                                image_rotary_emb=None, *args, **kwargs):
    text_seq_length = encoder_hidden_states.shape[1]
    x = torch.cat([hidden_states, encoder_hidden_states], dim=1)  # (B, N + T, D): text last
    h, gate = self.norm(x, emb=temb)
    mlp = self.act_mlp(self.proj_mlp(h))
    attn, context_attn = self.attn(hidden_states=h[:, :-text_seq_length, :],
                                   encoder_hidden_states=h[:, -text_seq_length:, :], attention_mask=attention_mask,
                                   image_rotary_emb=image_rotary_emb)
    attn = torch.cat([attn, context_attn], dim=1)
    x = residual(x, gate[:, None], self.proj_out(torch.cat([attn, mlp], dim=2)))
    return x[:, :-text_seq_length, :], x[:, -text_seq_length:, :]


def _sana_block(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, height=None, width=None):
    """SanaTransformerBlock: PixArt's scale_shift_table seams; its conv feed-forward works on
    (B, D, H, W) and hands back a (B, N, D) view strided along D, which the gated residual's
    launcher copies to unit D stride first (one copy; BENCHMARKS.md's counts note it)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        self.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)).chunk(6, dim=1)
    h = _mod(self.norm1, hidden_states, shift_msa, scale_msa, out_dtype=hidden_states.dtype)
    attn = self.attn1(h)  # (the block's own forward passes no mask here either)
    x = residual(hidden_states, gate_msa, attn)
    attn = self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask)
    x, h = _res_mod(self.norm2, x, None, attn, shift_mlp, scale_mlp)
    ff = self.ff(h.unflatten(1, (height, width)).permute(0, 3, 1, 2))
    return residual(x, gate_mlp, ff.flatten(2, 3).permute(0, 2, 1))


def _ltx_block(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, encoder_attention_mask=None):
    """LTX-Video: RMSNorm with shift, modulation per sample or per token (temb (B, 1|N, 6D));
    the ungated cross-attention residual fused with norm2 and the MLP's modulation."""
    n_ada = self.scale_shift_table.shape[0]
    ada = self.scale_shift_table[None, None].to(temb.device) + temb.reshape(hidden_states.size(0), temb.size(1),
                                                                              n_ada, -1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada.unbind(dim=2)  # (B, 1|N, D) views
    h = _mod(self.norm1, hidden_states, shift_msa, scale_msa)
    attn = self.attn1(hidden_states=h, encoder_hidden_states=None, image_rotary_emb=image_rotary_emb)
    x = residual(hidden_states, gate_msa, attn)
    attn = self.attn2(x, encoder_hidden_states=encoder_hidden_states, image_rotary_emb=None,
                      attention_mask=encoder_attention_mask)
    x, h = _res_mod(self.norm2, x, None, attn, shift_mlp, scale_mlp)
    return residual(x, gate_mlp, self.ff(h))


#################################################################################
#          Indexed (K = 2) block forwards: two modulations, one per token        #
#################################################################################
# QwenImage's ``zero_cond_t`` and HunyuanVideo's token replace give some image tokens a second
# modulation (the t = 0 one of condition tokens, the first frame's). Diffusers forms each
# (B, N, D) modulation per token (torch.where / slices and a cat); here the two sets are a
# (B, 2, D) table per modulation and an index (B, N) picks each token's row, read by the
# kernels in place (``*_indexed`` ops: LayerNorm without affine parameters, as these blocks have).


def _mod_rows(norm, x, shift, scale, index):
    """``norm(x) * (1 + scale) + shift``: (B, K, D) tables read through index (B, N), or (B, 1, D)
    per sample when index is None."""
    if index is None:
        return _mod(norm, x, shift, scale)
    return adaln_modulate_indexed(x, shift, scale, index, eps=norm.eps)


def _res_mod_rows(norm, x, gate, y, shift, scale, index):
    """``_res_mod`` with (B, K, D) tables read through index (B, N), or per sample."""
    if index is None:
        return _res_mod(norm, x, gate, y, shift, scale)
    return gated_residual_modulate_indexed(x, gate, y, shift, scale, index, eps=norm.eps)


def _residual_rows(x, gate, y, index):
    return residual(x, gate, y) if index is None else gated_residual_indexed(x, gate, y, index)


def _qwen_image_block(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                      image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None):
    """QwenImageTransformerBlock. With ``modulate_index`` (``zero_cond_t``: temb is (2B, D), the
    noisy timestep's rows, then the t = 0 ones of the condition tokens) the image projection
    (2B, 6D) is viewed as a (B, 2, 6D) table (no copy) and each token reads row
    ``modulate_index != 0``, the row diffusers' ``torch.where(index == 0, ...)`` picks; without
    it one modulation per sample. The text stream is always per sample."""
    img_mod = self.img_mod(temb)  # (B | 2B, 6D)
    txt_mod = self.txt_mod(temb.chunk(2, dim=0)[0] if self.zero_cond_t else temb)  # (B, 6D)
    if modulate_index is None:
        index, img_rows = None, img_mod[:, None]  # (B, 1, 6D)
    else:
        img_rows = img_mod.unflatten(0, (2, -1)).transpose(0, 1)  # (B, 2, 6D): row 0 noisy, row 1 t = 0
        index = modulate_index.ne(0).to(torch.int64).expand(hidden_states.shape[:2])  # (B, N)
    shift1, scale1, gate1, shift2, scale2, gate2 = img_rows.chunk(6, dim=-1)  # (B, 1|2, D) each
    c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = txt_mod[:, None].chunk(6, dim=-1)  # (B, 1, D)
    h = _mod_rows(self.img_norm1, hidden_states, shift1, scale1, index)
    hc = _mod(self.txt_norm1, encoder_hidden_states, c_shift1, c_scale1)
    attn, context_attn = self.attn(hidden_states=h, encoder_hidden_states=hc,
                                   encoder_hidden_states_mask=encoder_hidden_states_mask,
                                   image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    x, h = _res_mod_rows(self.img_norm2, hidden_states, gate1, attn, shift2, scale2, index)
    x = _residual_rows(x, gate2, self.img_mlp(h), index)
    c, hc = _res_mod(self.txt_norm2, encoder_hidden_states, c_gate1, context_attn, c_shift2, c_scale2)
    c = residual(c, c_gate2, self.txt_mlp(hc))
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return c, x


def _first_frame_index(x, num_tokens):
    """(B, N) int64 table rows of HunyuanVideo's token replace: 0 for the tokens diffusers slices
    as ``[:, :num_tokens]`` (the first frame's, with the t = 0 modulation), 1 for the rest."""
    n = x.shape[1]
    start = num_tokens if num_tokens >= 0 else n + num_tokens  # Python's slice bound (beyond N: all row 0)
    # token i >= start is row 1: i + 1 - start >= 1 exactly there (two small kernels, int64 directly)
    return torch.arange(1 - start, n + 1 - start, device=x.device).clamp_(0, 1).expand(x.shape[0], n)


def _token_replace_rows(norm, temb, token_replace_emb, chunks):
    """The two modulations of a token-replace norm as (B, 2, D) tables: its SiLU and Linear on
    (token_replace_emb, temb) stacked, row 0 the first frame's, row 1 the others'."""
    return norm.linear(norm.silu(torch.stack([token_replace_emb, temb], dim=1))).chunk(chunks, dim=-1)


def _token_replace_norm(self, hidden_states, emb, token_replace_emb, first_frame_num_tokens):
    """HunyuanVideoTokenReplaceAdaLayerNormZero (6 chunks) / ...Single (3) on their own (their
    blocks, fused, read the Linear themselves): one indexed LN + modulation; the chunks after
    shift and scale per sample, the others' then the first frame's, as diffusers returns them."""
    if first_frame_num_tokens is None:  # its own forward then doubles the tokens
        return type(self).forward(self, hidden_states, emb, token_replace_emb, first_frame_num_tokens)
    chunks = self.linear.out_features // hidden_states.shape[-1]
    shift, scale, *rest = _token_replace_rows(self, emb, token_replace_emb, chunks)  # (B, 2, D) each
    h = adaln_modulate_indexed(hidden_states, shift, scale, _first_frame_index(hidden_states, first_frame_num_tokens),
                               eps=self.norm.eps)
    return (h, *(t[:, 1] for t in rest), *(t[:, 0] for t in rest))


def _hunyuan_video_token_replace_block(self, hidden_states, encoder_hidden_states, temb, attention_mask=None,
                                       freqs_cis=None, token_replace_emb=None, num_tokens=None):
    """HunyuanVideoTokenReplaceTransformerBlock: the image stream's seams with K = 2 tables
    (norm1's projection of both embeddings), the text stream's as HunyuanVideo's own block."""
    if token_replace_emb is None or num_tokens is None:  # its own forward then fails or doubles tokens
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis,
                                  token_replace_emb, num_tokens)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _token_replace_rows(
        self.norm1, temb, token_replace_emb, 6)  # (B, 2, D) each
    index = _first_frame_index(hidden_states, num_tokens)
    h = adaln_modulate_indexed(hidden_states, shift_msa, scale_msa, index, eps=self.norm1.norm.eps)
    hc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
    attn, context_attn = self.attn(hidden_states=h, encoder_hidden_states=hc, attention_mask=attention_mask,
                                   image_rotary_emb=freqs_cis)
    x, h = gated_residual_modulate_indexed(hidden_states, gate_msa, attn, shift_mlp, scale_mlp, index,
                                           eps=self.norm2.eps)
    c, hc = _res_mod(self.norm2_context, encoder_hidden_states, c_gate_msa[:, None], context_attn,
                     c_shift_mlp[:, None], c_scale_mlp[:, None])
    return gated_residual_indexed(x, gate_mlp, self.ff(h), index), residual(c, c_gate_mlp[:, None],
                                                                           self.ff_context(hc))


def _hunyuan_video_token_replace_single_block(self, hidden_states, encoder_hidden_states, temb, attention_mask=None,
                                              image_rotary_emb=None, token_replace_emb=None, num_tokens=None):
    """HunyuanVideoTokenReplaceSingleTransformerBlock: one K = 2 indexed modulation over image
    and text tokens (the text after the image: its rows are 1), one indexed gated residual."""
    if token_replace_emb is None or num_tokens is None:
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb,
                                  token_replace_emb, num_tokens)
    text_seq_length = encoder_hidden_states.shape[1]
    x = torch.cat([hidden_states, encoder_hidden_states], dim=1)  # (B, N + T, D): text last
    shift, scale, gate = _token_replace_rows(self.norm, temb, token_replace_emb, 3)  # (B, 2, D) each
    index = _first_frame_index(x, num_tokens)
    h = adaln_modulate_indexed(x, shift, scale, index, eps=self.norm.norm.eps)
    mlp = self.act_mlp(self.proj_mlp(h))
    attn, context_attn = self.attn(hidden_states=h[:, :-text_seq_length, :],
                                   encoder_hidden_states=h[:, -text_seq_length:, :], attention_mask=attention_mask,
                                   image_rotary_emb=image_rotary_emb)
    attn = torch.cat([attn, context_attn], dim=1)
    x = gated_residual_indexed(x, gate, self.proj_out(torch.cat([attn, mlp], dim=2)), index)
    return x[:, :-text_seq_length, :], x[:, -text_seq_length:, :]


#################################################################################
#                Nomination: which class, its structure, its probe              #
#################################################################################

PROBE_B, PROBE_N, PROBE_T = 2, 3, 4  # batch, image tokens, text tokens (unequal: no broadcast passes by chance)


def _needs_norms(module, *names, rms_only=False):
    """None when every named submodule is a norm the fused ops compute, else the reason. ``rms_only``:
    an RMSNorm without bias (``_rms_spec``: the sandwich blocks')."""
    spec, what = ((_rms_spec, "an RMSNorm without bias") if rms_only else (_norm_spec, "a LayerNorm/RMSNorm"))
    for name in names:
        norm = getattr(module, name, None)
        if norm is None or spec(norm) is None:
            return f"{name} is {type(norm).__name__}, not {what} over the last dim"
    return None


def _rand(gen, *shape):
    return torch.randn(shape, generator=gen)


def _probe_norm(chunks: int, emb_kwarg: bool = True):
    """The probe of a norm module whose ``linear`` maps the embedding to ``chunks`` (B, D) pieces:
    x (B, N, D) and the embedding (B, in_features), passed as ``emb=`` or positionally."""
    def probe(m, gen):
        x = _rand(gen, PROBE_B, PROBE_N, m.linear.out_features // chunks)
        emb = _rand(gen, PROBE_B, m.linear.in_features)
        return ((x,), dict(emb=emb)) if emb_kwarg else ((x, emb), {})
    return probe


def _probe_ada_zero(m, gen):
    if m.emb is not None:  # its own timestep and class embedding
        d = m.linear.out_features // 6
        n_cls = m.emb.class_embedder.num_classes
        return (_rand(gen, PROBE_B, PROBE_N, d),), dict(timestep=torch.tensor([3.0, 700.0]),
                                                         class_labels=torch.tensor([0, n_cls - 1]),
                                                         hidden_dtype=torch.float32)
    return _probe_norm(6)(m, gen)


def _probe_cogvideox(m, gen):
    d = m.linear.out_features // 6
    return (_rand(gen, PROBE_B, PROBE_N, d), _rand(gen, PROBE_B, PROBE_T, d),
            _rand(gen, PROBE_B, m.linear.in_features)), {}


def _probe_basic(m, gen):
    d = m.dim
    kwargs = {}
    if m.norm_type == "ada_norm_zero":
        n_cls = m.norm1.emb.class_embedder.num_classes if m.norm1.emb is not None else 1
        kwargs.update(timestep=torch.tensor([3, 700]), class_labels=torch.tensor([0, n_cls - 1]))
    else:
        kwargs.update(timestep=_rand(gen, PROBE_B, 6 * d))
    cross = m.attn2 if m.attn2 is not None else (m.attn1 if m.only_cross_attention else None)
    if cross is not None:
        kwargs["encoder_hidden_states"] = _rand(gen, PROBE_B, PROBE_T, cross.to_k.in_features)
    return (_rand(gen, PROBE_B, PROBE_N, d),), kwargs


def _probe_flux(m, gen):
    norm = m.norm1 if hasattr(m, "norm1") else m.norm
    d = norm.linear.in_features
    return (_rand(gen, PROBE_B, PROBE_N, d), _rand(gen, PROBE_B, PROBE_T, d), _rand(gen, PROBE_B, d)), {}


def _probe_wan(m, gen):
    d = m.scale_shift_table.shape[-1]
    cross = m.attn2.to_k.in_features
    return (_rand(gen, PROBE_B, PROBE_N, d), _rand(gen, PROBE_B, PROBE_T, cross), _rand(gen, PROBE_B, 6, d),
            None), {}


def _probe_ltx(m, gen):
    d = m.scale_shift_table.shape[-1]
    return (_rand(gen, PROBE_B, PROBE_N, d), _rand(gen, PROBE_B, PROBE_T, m.attn2.to_k.in_features),
            _rand(gen, PROBE_B, PROBE_N, 6 * d)), {}  # per-token modulation


def _probe_sana(m, gen):
    d = m.scale_shift_table.shape[-1]
    return (_rand(gen, PROBE_B, 6, d),), dict(encoder_hidden_states=_rand(gen, PROBE_B, PROBE_T,
                                                                          m.attn2.to_k.in_features),
                                              timestep=_rand(gen, PROBE_B, 6 * d), height=2, width=3)


def _check_sana(m):
    if getattr(m, "attn2", None) is None:
        return "it has no cross-attention (its forward then fails on norm2 itself)"
    return _needs_norms(m, "norm1", "norm2")


def _check_ltx(m):
    if m.scale_shift_table.shape[0] != 6:
        return f"scale_shift_table has {m.scale_shift_table.shape[0]} rows, not 6"
    return _needs_norms(m, "norm1", "norm2")


def _check_joint(m):
    return _needs_norms(m, "norm2", *(() if m.context_pre_only else ("norm2_context",)))


def _check_wan(m):
    if not isinstance(m.norm2, nn.Identity):
        return _needs_norms(m, "norm1", "norm2", "norm3")
    return _needs_norms(m, "norm1", "norm3")


def _check_basic(m):
    if m.norm_type not in ("ada_norm_zero", "ada_norm_single"):
        return f"norm_type {m.norm_type!r} (only ada_norm_zero and ada_norm_single are fused)"
    if m.pos_embed is not None:
        return "it has a positional embedding between its norms"
    if m.norm_type == "ada_norm_zero":
        return _needs_norms(m, "norm3", *(("norm2",) if m.attn2 is not None else ()))
    return _needs_norms(m, "norm1", "norm2")


def _plain_layer_norms(module, *names):
    """The indexed ops' norm: a LayerNorm without affine parameters at each (dotted) name."""
    for name in names:
        try:
            spec = _norm_spec(module.get_submodule(name))
        except AttributeError:
            spec = None
        if spec is None or spec[0] or spec[1] is not None or spec[2] is not None:
            return f"{name} is not a LayerNorm without affine parameters (the indexed forms' norm)"
    return None


def _unhooked(module, *names):
    """Modules the fused block never calls (it calls their Linear and SiLU) carry no hooks."""
    for name in names:
        sub = module.get_submodule(name)
        if sub._forward_hooks or sub._forward_pre_hooks:
            return f"{name} has forward hooks, which the fused path (it never calls {name}) would not fire"
    return None


def _check_qwen_image(m):
    img = _plain_layer_norms(m, "img_norm1", "img_norm2") if m.zero_cond_t else _needs_norms(m, "img_norm1",
                                                                                            "img_norm2")
    return img or _needs_norms(m, "txt_norm1", "txt_norm2")


def _check_token_replace(m):
    return (_plain_layer_norms(m, "norm1.norm", "norm2") or _needs_norms(m, "norm2_context")
            or _unhooked(m, "norm1", "norm1.norm"))


def _check_token_replace_single(m):
    return _plain_layer_norms(m, "norm.norm") or _unhooked(m, "norm", "norm.norm")


def _probe_qwen_image(m, gen):
    """zero_cond_t: temb (2B, D) and a modulate_index with both rows in each sample (and a 2,
    which diffusers' torch.where also reads as row 1); else temb (B, D), no index."""
    temb = _rand(gen, 2 * PROBE_B if m.zero_cond_t else PROBE_B, m.dim)
    index = torch.tensor([[0, 1, 1], [1, 0, 2]], dtype=torch.int32) if m.zero_cond_t else None
    return (_rand(gen, PROBE_B, PROBE_N, m.dim), _rand(gen, PROBE_B, PROBE_T, m.dim), None, temb), dict(
        modulate_index=index)


def _probe_token_replace_norm(m, gen):
    """x (B, N, D), emb and token_replace_emb (B, D), the first token replaced."""
    d = m.linear.in_features
    return (_rand(gen, PROBE_B, PROBE_N, d), _rand(gen, PROBE_B, d), _rand(gen, PROBE_B, d), 1), {}


def _probe_token_replace(num_tokens):
    """x (B, N, D), text (B, T, D), temb and token_replace_emb (B, D); the first ``num_tokens``
    (of the image tokens, or of image and text together in the single block) replaced."""
    def probe(m, gen):
        d = (m.norm1 if hasattr(m, "norm1") else m.norm).linear.in_features
        return (_rand(gen, PROBE_B, PROBE_N, d), _rand(gen, PROBE_B, PROBE_T, d), _rand(gen, PROBE_B, d)), dict(
            token_replace_emb=_rand(gen, PROBE_B, d), num_tokens=num_tokens)
    return probe


# (module, class, kind, fused forward, structure check, probe) of the indexed forms, for _specs
_INDEXED_SPECS = [
    ("transformers.transformer_hunyuan_video", "HunyuanVideoTokenReplaceAdaLayerNormZero", "norm",
     _token_replace_norm, lambda m: _plain_layer_norms(m, "norm"), _probe_token_replace_norm),
    ("transformers.transformer_hunyuan_video", "HunyuanVideoTokenReplaceAdaLayerNormZeroSingle", "norm",
     _token_replace_norm, lambda m: _plain_layer_norms(m, "norm"), _probe_token_replace_norm),
    ("transformers.transformer_qwenimage", "QwenImageTransformerBlock", "block", _qwen_image_block,
     _check_qwen_image, _probe_qwen_image),
    ("transformers.transformer_hunyuan_video", "HunyuanVideoTokenReplaceTransformerBlock", "block",
     _hunyuan_video_token_replace_block, _check_token_replace, _probe_token_replace(1)),
    ("transformers.transformer_hunyuan_video", "HunyuanVideoTokenReplaceSingleTransformerBlock", "block",
     _hunyuan_video_token_replace_single_block, _check_token_replace_single, _probe_token_replace(PROBE_N - 1)),
]


#################################################################################
#          RMSNorm sandwich blocks (Lumina2, Mochi): forwards, checks, probes     #
#################################################################################


def _rms_spec(norm: nn.Module):
    """(weight, eps) of an RMSNorm over the last dim without bias: diffusers' ``RMSNorm`` (weight
    optional) or Mochi's ``MochiModulatedRMSNorm`` (an unweighted RMSNorm in fp32, its output cast
    back to its input's dtype); None for anything else."""
    from diffusers.models.transformers.transformer_mochi import MochiModulatedRMSNorm  # optional dependency

    if type(norm) is MochiModulatedRMSNorm:
        norm = norm.norm
    spec = _norm_spec(norm)
    if spec is None or not spec[0] or spec[2] is not None:
        return None
    return spec[1], spec[3]


def _sandwich(y_norm, x, gate, y, next_norm=None, scale=None, out_dtype=None):
    """``x_new = x + tanh(gate) * y_norm(y)`` (gate (B, 1, D) or None: ``x + y_norm(y)``) in one pass,
    with ``next_norm``: also ``h = next_norm(x_new) * (1 + scale)``, returning (x_new, h)."""
    y_weight, y_eps = _rms_spec(y_norm)
    if next_norm is None:
        return sandwich_residual(x, gate, y, y_weight=y_weight, y_eps=y_eps, out_dtype=out_dtype)
    weight, eps = _rms_spec(next_norm)
    return sandwich_residual_norm_modulate(x, gate, y, scale, y_weight=y_weight, weight=weight, y_eps=y_eps, eps=eps,
                                           out_dtype=out_dtype)


def _lumina2_block(self, hidden_states, attention_mask, image_rotary_emb, temb=None):
    """Lumina2TransformerBlock: each sub-block's output RMS-normalised (norm2, ffn_norm2) before its
    tanh-gated residual, fused with the next RMSNorm and modulation (ffn_norm1); the refiner
    blocks (``modulation`` False) have neither gate nor modulation."""
    if self.modulation:
        h, gate_msa, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        gate_msa, scale_mlp, gate_mlp = gate_msa[:, None], scale_mlp[:, None], gate_mlp[:, None]  # (B, 1, D)
    else:
        h, gate_msa, scale_mlp, gate_mlp = self.norm1(hidden_states), None, None, None
    attn = self.attn(hidden_states=h, encoder_hidden_states=h, attention_mask=attention_mask,
                     image_rotary_emb=image_rotary_emb)
    x, h = _sandwich(self.norm2, hidden_states, gate_msa, attn, self.ffn_norm1, scale_mlp)
    return _sandwich(self.ffn_norm2, x, gate_mlp, self.feed_forward(h))


def _mochi_stream(norms, ff, x, attn, gate_msa, scale_mlp, gate_mlp):
    """One stream of a Mochi block after its attention: x + norm2(attn) * tanh(gate_msa), h =
    norm3(x) * (1 + scale_mlp), then x + norm4(ff(h)) * tanh(gate_mlp); each norm returns its
    input's dtype (MochiModulatedRMSNorm), so x_new is in eager's promoted dtype and h in x_new's."""
    norm2, norm3, norm4 = norms
    x, h = _sandwich(norm2, x, gate_msa[:, None], attn, norm3, scale_mlp[:, None],
                     out_dtype=torch.promote_types(x.dtype, attn.dtype))
    ff_out = ff(h)
    return _sandwich(norm4, x, gate_mlp[:, None], ff_out, out_dtype=torch.promote_types(x.dtype, ff_out.dtype))


def _mochi_block(self, hidden_states, encoder_hidden_states, temb, encoder_attention_mask, image_rotary_emb=None):
    """MochiTransformerBlock: both streams' sandwich seams (the last block's context stream,
    ``context_pre_only``, ends after attention and is returned as it came)."""
    h, gate_msa, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
    if self.context_pre_only:
        hc = self.norm1_context(encoder_hidden_states, temb)
    else:
        hc, c_gate_msa, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)
    attn, context_attn = self.attn1(hidden_states=h, encoder_hidden_states=hc, image_rotary_emb=image_rotary_emb,
                                    attention_mask=encoder_attention_mask)
    x = _mochi_stream((self.norm2, self.norm3, self.norm4), self.ff, hidden_states, attn, gate_msa, scale_mlp,
                      gate_mlp)
    if not self.context_pre_only:
        encoder_hidden_states = _mochi_stream((self.norm2_context, self.norm3_context, self.norm4_context),
                                              self.ff_context, encoder_hidden_states, context_attn, c_gate_msa,
                                              c_scale_mlp, c_gate_mlp)
    return x, encoder_hidden_states


def _check_lumina2(m):
    return _needs_norms(m, "norm2", "ffn_norm1", "ffn_norm2", rms_only=True)


def _check_mochi(m):
    return _needs_norms(m, "norm2", "norm3", "norm4",
                        *(() if m.context_pre_only else ("norm2_context", "norm3_context", "norm4_context")),
                        rms_only=True)


def _probe_lumina2(m, gen):
    temb = _rand(gen, PROBE_B, m.norm1.linear.in_features) if m.modulation else None
    return (_rand(gen, PROBE_B, PROBE_N, m.attn.to_q.in_features), None, None, temb), {}


def _probe_mochi(m, gen):
    d = m.norm1.linear.out_features // 4
    ctx = m.norm1_context.linear_1.out_features if m.context_pre_only else m.norm1_context.linear.out_features // 4
    mask = torch.ones(PROBE_B, PROBE_T, dtype=torch.bool)
    mask[0, -1] = False  # one padded prompt token
    return (_rand(gen, PROBE_B, PROBE_N, d), _rand(gen, PROBE_B, PROBE_T, ctx),
            _rand(gen, PROBE_B, m.norm1.linear.in_features), mask), {}


# (module, class, kind, fused forward, structure check, probe) of the sandwich blocks, for _specs
_SANDWICH_SPECS = [
    ("transformers.transformer_lumina2", "Lumina2TransformerBlock", "block", _lumina2_block, _check_lumina2,
     _probe_lumina2),
    ("transformers.transformer_mochi", "MochiTransformerBlock", "block", _mochi_block, _check_mochi, _probe_mochi),
]


def _specs():
    """{diffusers class: (kind, fused forward, structure check, probe inputs)}, for the classes
    this diffusers release has (imported here: diffusers is optional)."""
    def norm(*names):
        return lambda m: _needs_norms(m, *names)

    table = [
        ("normalization", "AdaLayerNormZero", "norm", _ada_layer_norm_zero, norm("norm"), _probe_ada_zero),
        ("normalization", "AdaLayerNormZeroSingle", "norm", _ada_layer_norm_zero_single, norm("norm"), _probe_norm(3)),
        ("normalization", "AdaLayerNormContinuous", "norm", _ada_layer_norm_continuous, norm("norm"),
         _probe_norm(2, emb_kwarg=False)),
        ("normalization", "SD35AdaLayerNormZeroX", "norm", _sd35_ada_layer_norm_zero_x, norm("norm"), _probe_norm(9)),
        ("normalization", "CogVideoXLayerNormZero", "norm", _cogvideox_layer_norm_zero, norm("norm"),
         _probe_cogvideox),
        ("normalization", "LuminaRMSNormZero", "norm", _lumina_rms_norm_zero, norm("norm"),
         _probe_norm(4, emb_kwarg=False)),
        ("transformers.transformer_mochi", "MochiRMSNormZero", "norm", _mochi_rms_norm_zero, norm("norm"),
         _probe_norm(4, emb_kwarg=False)),
        ("attention", "BasicTransformerBlock", "block", _basic_block, _check_basic, _probe_basic),
        ("transformers.transformer_flux", "FluxTransformerBlock", "block", _flux_double_block,
         norm("norm2", "norm2_context"), _probe_flux),
        ("transformers.transformer_flux", "FluxSingleTransformerBlock", "block", _flux_single_block,
         lambda m: None, _probe_flux),
        ("attention", "JointTransformerBlock", "block", _joint_block, _check_joint, _probe_flux),
        ("transformers.transformer_hunyuan_video", "HunyuanVideoTransformerBlock", "block", _hunyuan_video_block,
         norm("norm2", "norm2_context"), _probe_flux),
        ("transformers.transformer_hunyuan_video", "HunyuanVideoSingleTransformerBlock", "block",
         _hunyuan_video_single_block, lambda m: None, _probe_flux),
        ("transformers.sana_transformer", "SanaTransformerBlock", "block", _sana_block, _check_sana, _probe_sana),
        ("transformers.transformer_ltx", "LTXVideoTransformerBlock", "block", _ltx_block, _check_ltx, _probe_ltx),
        ("transformers.transformer_wan", "WanTransformerBlock", "block", _wan_block, _check_wan, _probe_wan),
    ] + _INDEXED_SPECS + _SANDWICH_SPECS
    specs = {}
    for module_name, class_name, *spec in table:
        try:
            cls = getattr(importlib.import_module(f"diffusers.models.{module_name}"), class_name)
        except (ImportError, AttributeError):  # a diffusers release without it: nothing of that class to patch
            continue
        specs[cls] = tuple(spec)
    return specs


FUSED = {  # name -> function, so a pickled FusedForward refers to functions by name
    f.__name__: f for f in (_ada_layer_norm_zero, _ada_layer_norm_zero_single, _ada_layer_norm_continuous,
                            _sd35_ada_layer_norm_zero_x, _cogvideox_layer_norm_zero, _basic_block,
                            _flux_double_block, _flux_single_block, _wan_block, _joint_block, _ltx_block, _sana_block,
                            _hunyuan_video_block, _hunyuan_video_single_block,
                            _lumina_rms_norm_zero, _mochi_rms_norm_zero)
}
FUSED.update({spec[3].__name__: spec[3] for spec in _INDEXED_SPECS + _SANDWICH_SPECS})


class FusedForward:
    """The patched ``forward`` of one module (picklable). ``active`` False: the module's own
    forward (what ``unpatch_diffusers`` leaves under a hook registered after the patch)."""

    def __init__(self, module: nn.Module, fused: str):
        self.module, self.fused, self.active = module, fused, True

    def __call__(self, *args, **kwargs):
        if self.active:
            return FUSED[self.fused](self.module, *args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


#################################################################################
#                                 Probe and patch                               #
#################################################################################


def _outputs(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


@torch.no_grad()
def _judge(module: nn.Module, fused, probe_inputs) -> str | None:
    """None when ``fused`` reproduces the module's own forward on a random-weight copy in fp32."""
    probe = copy.deepcopy(module).eval().float()
    device = next((p.device for p in probe.parameters()), torch.device("cpu"))
    # drawn where the weights live (a full-size block's on its GPU, not through host memory)
    weights_gen = torch.Generator(device=device).manual_seed(0)
    for prm in probe.parameters():  # every parameter redrawn: zero-init gates would hide errors
        prm.copy_(0.5 * torch.randn(prm.shape, generator=weights_gen, device=device))
    gen = torch.Generator().manual_seed(0)
    args, kwargs = probe_inputs(probe, gen)
    args = [a.to(device) if torch.is_tensor(a) else a for a in args]
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    try:
        want = _outputs(type(probe).forward(probe, *args, **kwargs))
    except Exception as err:  # noqa: BLE001 - a probe its forward does not take: say so, patch nothing
        return f"the probe input does not suit its forward ({type(err).__name__}: {err})"
    try:
        got = _outputs(fused(probe, *args, **kwargs))
    except Exception as err:  # noqa: BLE001 - e.g. a submodule called with other arguments
        return f"the fused forward cannot run it ({type(err).__name__}: {err})"
    if len(got) != len(want):
        return f"its forward returns {len(want)} values, the fused one {len(got)}"
    for i, (w, g) in enumerate(zip(want, got)):
        if w is None and g is None:  # e.g. the context stream of SD3's last block
            continue
        if not (torch.is_tensor(w) and torch.is_tensor(g)) or w.shape != g.shape:
            return f"output {i}: {getattr(w, 'shape', w)} against the fused {getattr(g, 'shape', g)}"
        diff = (w.float() - g.float()).abs().max().item() if w.numel() else 0.0
        if not diff <= 1e-4 * max(w.float().abs().max().item() if w.numel() else 0.0, 1.0):
            return f"output {i} differs by {diff:.3g} on a random probe (its forward computes something else)"
    return None


def _hooked(transformer: nn.Module) -> str | None:
    """The first module carrying diffusers' or accelerate's hooks (they wrap ``forward``)."""
    for name, m in transformer.named_modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and getattr(registry, "hooks", None):
            return f"{name or type(m).__name__} has diffusers hooks ({', '.join(registry.hooks)})"
        if hasattr(m, "_hf_hook"):
            return f"{name or type(m).__name__} has an accelerate hook ({type(m._hf_hook).__name__})"
    return None


def _bypassed_hooks(module: nn.Module) -> str | None:
    """Forward hooks on a norm the fused path does not call would no longer fire."""
    for name, sub in module.named_children():
        if (_norm_spec(sub) or _rms_spec(sub)) is not None and (sub._forward_hooks or sub._forward_pre_hooks):
            return f"{name} has forward hooks, which the fused path (it never calls {name}) would not fire"
    return None


class DiffusersPatchReport(PatchReport):
    """An int (how many modules were patched), ``patched``: (name, class) pairs, ``skipped``:
    (name, reason) pairs."""

    patched: list

    def __new__(cls, patched: list, skipped: list):
        report = super().__new__(cls, len(patched), skipped)
        report.patched = list(patched)
        return report

    def by_class(self) -> dict:
        counts: dict = {}
        for _, cls_name in self.patched:
            counts[cls_name] = counts.get(cls_name, 0) + 1
        return counts

    def __str__(self) -> str:
        text = f"patched {int(self)} module(s)"
        if self.patched:
            text += " (" + ", ".join(f"{n} x {c}" for c, n in self.by_class().items()) + ")"
        if self.skipped:
            text += f", skipped {len(self.skipped)}: " + "; ".join(f"{n} ({why})" for n, why in self.skipped)
        return text

    __repr__ = __str__


def patch_diffusers(transformer: nn.Module, *, verbose: bool = True) -> DiffusersPatchReport:
    """Rebind the forward of every supported diffusers norm module and block in ``transformer``
    whose own forward the fused one reproduces (probed on a random-weight copy). Returns a
    report (an int: how many; ``.patched``, ``.skipped`` with reasons, each skip also warned
    about when ``verbose``). Patch before enabling diffusers' caches, group offloading,
    layerwise casting or CPU offload: a transformer that carries their hooks is refused.
    Patching twice is harmless (patched modules are skipped)."""
    hooked = _hooked(transformer)
    if hooked is not None:
        raise ValueError(f"pf_kernels.patch_diffusers: {hooked}; call patch_diffusers(transformer) before "
                         "enable_cache, group offloading, layerwise casting or CPU offload (they wrap the forward "
                         "they find), or on a freshly loaded transformer")
    specs = _specs()
    patched, skipped = [], []
    # Norm modules first: a block's probe then runs through its patched norms.
    modules = sorted(transformer.named_modules(), key=lambda nm: specs.get(type(nm[1]), ("z",))[0] != "norm")
    for name, module in modules:
        spec = specs.get(type(module))
        if spec is None or hasattr(module, _MARK):
            continue
        kind, fused, check, probe_inputs = spec
        label = name or type(module).__name__
        reason = check(module) or _bypassed_hooks(module)
        if reason is None and "forward" in module.__dict__:
            reason = "its forward is replaced on the instance (a wrapper the fused path would drop)"
        reason = reason or _judge(module, fused, probe_inputs)
        if reason is not None:
            skipped.append((label, reason))
            if verbose:
                warnings.warn(f"pf_kernels.patch_diffusers: left {label} ({type(module).__name__}) as it is: {reason}",
                              stacklevel=2)
            continue
        forward = FusedForward(module, fused.__name__)
        module.forward = forward  # an instance attribute: the class and its other instances are untouched
        setattr(module, _MARK, forward)
        patched.append((label, type(module).__name__))
    return DiffusersPatchReport(patched, skipped)


def unpatch_diffusers(transformer: nn.Module) -> int:
    """Undo ``patch_diffusers``; returns how many modules were restored. A patched forward that a
    hook has wrapped since (registered after the patch) is switched off in place, so the hook
    stays and runs the module's own forward; otherwise the instance forward is removed."""
    restored = 0
    for module in transformer.modules():
        forward = module.__dict__.get(_MARK)
        if forward is None:
            continue
        forward.active = False
        if module.__dict__.get("forward") is forward:
            del module.forward
        delattr(module, _MARK)
        restored += 1
    return restored
