"""patch_diffusers' indexed (K = 2) forms: QwenImage's ``zero_cond_t`` (condition tokens read the
t = 0 modulation) and HunyuanVideo's token replace (the first frame's tokens read their own).
Tiny, fully random diffusers models give the same outputs and input and parameter grads patched
(Triton kernels, interpreter on the CPU) as diffusers' own code, with (B, 2, D) tables whose two
rows both serve tokens; the same in bf16 (torch path); dynamo traces the blocks whole; the
structure checks refuse what the indexed ops do not compute.
"""

import copy

import pytest
import torch

import pf_kernels
from pf_kernels import diffusers_patch
from pf_kernels.diffusers_patch import patch_diffusers
from pf_kernels.ops._utils import LAUNCHES
from kernel_cases import needs_interp
from test_patch_diffusers import (
    B,
    assert_bf16_like_diffusers,
    assert_regional_compile_matches,
    assert_same,
    randomise,
    run,
)

diffusers = pytest.importorskip("diffusers")


def qwen_image(zero_cond_t=True):
    model = diffusers.QwenImageTransformer2DModel(patch_size=1, in_channels=8, out_channels=4, num_layers=2,
                                                  attention_head_dim=8, num_attention_heads=3, joint_attention_dim=16,
                                                  axes_dims_rope=(2, 2, 4), zero_cond_t=zero_cond_t)
    gen = torch.Generator().manual_seed(12)
    # zero_cond_t: a 2 x 2 noisy image, then a 1 x 2 condition image (modulate_index 0 0 0 0 1 1)
    shapes = [[(1, 2, 2), (1, 1, 2)]] * B if zero_cond_t else [[(1, 2, 3)]] * B
    mask = torch.ones(B, 5)
    mask[1, 3:] = 0  # a padded caption
    inputs = dict(hidden_states=torch.randn(B, 6, 8, generator=gen),
                  encoder_hidden_states=torch.randn(B, 5, 16, generator=gen), encoder_hidden_states_mask=mask,
                  timestep=torch.tensor([0.3, 0.9]), img_shapes=shapes)
    return model, inputs, {"AdaLayerNormContinuous": 1, "QwenImageTransformerBlock": 2}


def hunyuan_video_token_replace():
    model = diffusers.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                     attention_head_dim=12, num_layers=1, num_single_layers=1,
                                                     num_refiner_layers=1, patch_size=1, text_embed_dim=16,
                                                     pooled_projection_dim=8, rope_axes_dim=(2, 4, 6),
                                                     guidance_embeds=False, image_condition_type="token_replace")
    gen = torch.Generator().manual_seed(13)
    # two latent frames of 2 x 3 tokens: the first frame's 6 tokens replaced, 6 not
    inputs = dict(hidden_states=torch.randn(B, 4, 2, 2, 3, generator=gen), timestep=torch.tensor([3, 801]),
                  encoder_hidden_states=torch.randn(B, 5, 16, generator=gen),
                  encoder_attention_mask=torch.ones(B, 5), pooled_projections=torch.randn(B, 8, generator=gen))
    return model, inputs, {"AdaLayerNormZero": 1, "AdaLayerNormContinuous": 1,
                           "HunyuanVideoTokenReplaceAdaLayerNormZero": 1,
                           "HunyuanVideoTokenReplaceAdaLayerNormZeroSingle": 1,
                           "HunyuanVideoTokenReplaceTransformerBlock": 1,
                           "HunyuanVideoTokenReplaceSingleTransformerBlock": 1}


FAMILIES = {"qwen_image_zero_cond_t": qwen_image, "qwen_image": lambda: qwen_image(zero_cond_t=False),
            "hunyuan_video_token_replace": hunyuan_video_token_replace}
INDEXED_OPS = ("adaln_modulate_indexed", "gated_residual_modulate_indexed", "gated_residual_indexed")


def record_tables(monkeypatch):
    """Wraps the indexed ops the fused blocks call: a list of (op, K, the table rows the index uses)."""
    calls = []

    def recording(name):
        op = getattr(diffusers_patch, name)

        def call(x, *args, **kwargs):
            index = args[-1]  # each op's tables come first, the index last
            calls.append((name, args[0].shape[1], sorted(index.unique().tolist())))
            return op(x, *args, **kwargs)
        return call

    for name in INDEXED_OPS:
        monkeypatch.setattr(diffusers_patch, name, recording(name))
    return calls


@needs_interp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_outputs_and_grads_through_the_indexed_kernels(family, triton_backend, monkeypatch):
    model, inputs, expected = FAMILIES[family]()
    randomise(model)
    want = run(model, inputs, "torch")  # diffusers' own forward, unpatched
    patched = copy.deepcopy(model)
    report = patch_diffusers(patched)
    assert report.by_class() == expected and not report.skipped, str(report)
    calls = record_tables(monkeypatch)
    before = {k: LAUNCHES[k] for k in ("adaln_modulate_table_grads", "gated_residual_modulate_table_grads")}
    got = run(patched, inputs, "triton")
    assert_same(got, want)
    if family == "qwen_image":  # no zero_cond_t: one modulation per sample, nothing indexed
        assert not calls
        return
    # every indexed call: a (B, 2, D) table whose two rows both serve tokens
    assert {name for name, _, _ in calls} == set(INDEXED_OPS)
    assert all(k == 2 and rows == [0, 1] for _, k, rows in calls), calls
    assert all(LAUNCHES[k] > n for k, n in before.items())  # the table grads summed by the kernels


@needs_interp
@pytest.mark.parametrize("single", [False, True])
def test_token_replace_norm_modules_alone(single, triton_backend, monkeypatch):
    """Each token-replace norm module called on its own (random weights, D = 40, 5 tokens, the
    first 2 replaced): outputs, input and parameter grads the same patched (kernels) as its
    own forward, through one K = 2 indexed modulation."""
    from diffusers.models.transformers import transformer_hunyuan_video as hv

    d = 40
    module = (hv.HunyuanVideoTokenReplaceAdaLayerNormZeroSingle if single else
              hv.HunyuanVideoTokenReplaceAdaLayerNormZero)(d)
    randomise(module, seed=4)
    patched = copy.deepcopy(module)
    assert int(patch_diffusers(patched)) == 1
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(B, 5, d, generator=gen), torch.randn(B, d, generator=gen), torch.randn(B, d, generator=gen)]

    def grads(m, backend):
        m.zero_grad(set_to_none=True)
        leaves = [t.clone().requires_grad_() for t in inputs]
        with pf_kernels.use_backend(backend):
            outs = m(*leaves, 2)
        sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i))).sum()
            for i, o in enumerate(outs)).backward()
        return [o.detach() for o in outs], [t.grad for t in leaves], [p.grad for p in m.parameters()]

    want = grads(module, "torch")
    calls = record_tables(monkeypatch)
    got = grads(patched, "triton")
    assert [(k, rows) for _, k, rows in calls] == [(2, [0, 1])]
    for a, b in zip(got, want):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_models_stay_bf16_within_a_few_ulps(family):
    model, inputs, _ = FAMILIES[family]()
    assert_bf16_like_diffusers(model, inputs)


@pytest.mark.parametrize("family,backend", [("qwen_image_zero_cond_t", "torch"), ("hunyuan_video_token_replace", "torch"),
                                            pytest.param("qwen_image_zero_cond_t", "triton", marks=needs_interp)])
def test_dynamo_traces_the_indexed_blocks_whole(family, backend):
    """compile_repeated_blocks(fullgraph=True) over the patched K = 2 blocks: no graph break
    (the index is built from shapes and ints on the device), the same output; through the
    torch path, and through the Triton route (the indexed custom ops stay opaque nodes)."""
    model, inputs, _ = FAMILIES[family]()
    # (HunyuanVideo's own list names its plain blocks, not the token-replace ones)
    assert_regional_compile_matches(model, inputs, backend, ["HunyuanVideoTokenReplaceTransformerBlock",
                                                             "HunyuanVideoTokenReplaceSingleTransformerBlock"])


@pytest.mark.parametrize("family", ["qwen_image_zero_cond_t", "hunyuan_video_token_replace"])
def test_gradient_checkpointing_calls_the_fused_blocks_positionally(family):
    """Under gradient checkpointing diffusers calls each block with positional arguments (the
    index and the token count last): the fused forwards take them in that order, same grads."""
    model, inputs, _ = FAMILIES[family]()
    randomise(model)
    want = run(model, inputs, "torch")
    patch_diffusers(model)
    model.enable_gradient_checkpointing()
    model.train()  # (dropout-free blocks: the same numbers as in eval)
    assert_same(run(model, inputs, "torch"), want)


def test_structure_checks_refuse_what_the_indexed_ops_do_not_compute():
    """An affine image norm under zero_cond_t (the indexed ops' LayerNorm has no weight), a
    token-replace norm with a forward hook (the fused block reads its Linear, never calls it):
    left as they are, with the reason; the plain QwenImage block takes any norm the per-sample
    ops fold."""
    model, _, _ = qwen_image()
    model.transformer_blocks[0].img_norm2 = torch.nn.LayerNorm(24, eps=1e-6)
    report = patch_diffusers(model, verbose=False)
    assert "img_norm2 is not a LayerNorm without affine" in dict(report.skipped)["transformer_blocks.0"]
    assert ("transformer_blocks.1", "QwenImageTransformerBlock") in report.patched

    plain, _, _ = qwen_image(zero_cond_t=False)
    plain.transformer_blocks[0].img_norm2 = torch.nn.LayerNorm(24, eps=1e-6)
    assert patch_diffusers(plain, verbose=False).by_class()["QwenImageTransformerBlock"] == 2

    model, _, _ = hunyuan_video_token_replace()
    model.transformer_blocks[0].norm1.register_forward_pre_hook(lambda *a: None)
    model.single_transformer_blocks[0].norm.norm.register_forward_hook(lambda *a: None)
    report = patch_diffusers(model, verbose=False)
    assert "norm1 has forward hooks" in dict(report.skipped)["transformer_blocks.0"]
    assert "norm.norm has forward hooks" in dict(report.skipped)["single_transformer_blocks.0"]


def test_attention_processors_and_kwargs_pass_through():
    """The fused QwenImage block calls self.attn: a processor set after patching runs in each
    block, with the model's attention_kwargs and the caption mask as diffusers passes them."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    model, inputs, _ = qwen_image()
    randomise(model)
    with torch.no_grad():
        want = model(**inputs).sample
    patch_diffusers(model)
    seen = []

    class Recording(QwenDoubleStreamAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                     attention_mask=None, image_rotary_emb=None, marker=None):
            seen.append((marker, encoder_hidden_states_mask is not None and not encoder_hidden_states_mask.all()))
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)

    model.set_attn_processor(Recording())
    with torch.no_grad():
        got = model(**inputs, attention_kwargs={"marker": "m"}).sample
    assert seen == [("m", True), ("m", True)]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_probe_catches_a_wrong_row_choice(monkeypatch):
    """A fused forward that gave every token the noisy timestep's row (index all 0) would pass
    a probe without condition tokens: the probe's index has both rows, so it is refused."""
    real = diffusers_patch._qwen_image_block

    def first_row_only(self, *args, modulate_index=None, **kwargs):
        return real(self, *args, modulate_index=None if modulate_index is None else modulate_index * 0, **kwargs)

    first_row_only.__name__ = real.__name__
    specs = diffusers_patch._specs
    monkeypatch.setattr(diffusers_patch, "_specs", lambda: {
        cls: (spec[0], first_row_only, *spec[2:]) if cls.__name__ == "QwenImageTransformerBlock" else spec
        for cls, spec in specs().items()})
    model, _, _ = qwen_image()
    report = patch_diffusers(model, verbose=False)
    assert "differs" in dict(report.skipped)["transformer_blocks.0"]
