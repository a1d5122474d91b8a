"""The text-to-image model (SPEC.md section 11) against an independent float64 reference,
its key-padding mask, deduplicated conditioning, presets, checkpoints and input errors."""

from __future__ import annotations

import pytest
import torch

import t2i_reference
from pf.conditioning import TextCond
from pf.models import PF_T2I_models, PatchForcingT2I, load_checkpoint, num_params
from pf.models.checkpoint import model_checkpoint, save_checkpoint

SMALL = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, head_dim=16, text_dim=12,
             text_head_dim=8, cond_width=8)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight non-zero (the zero-initialised ones included), so every path counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):  # the cosine-attention scales stay positive
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 4 + 1)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _text(b: int, length: int, dim: int, valid: list[int], seed: int = 1, dtype=torch.float64) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, length, dim, generator=g, dtype=dtype)
    mask = torch.arange(length)[None, :] < torch.tensor(valid)[:, None]  # (B, L)
    return TextCond(tokens, mask)


def test_matches_the_float64_reference_on_a_non_square_image():
    torch.manual_seed(0)
    model = PatchForcingT2I(**SMALL).double().eval()
    model.dedup_max_distinct = 0
    _randomise(model)
    x = torch.randn(2, 2, 6, 4, dtype=torch.float64)  # 3 x 2 patches: positions on a relative canvas
    t = torch.rand(2, 6, dtype=torch.float64)
    cond = _text(2, 5, 12, valid=[5, 3])  # the second prompt padded by 2 tokens
    v, logvar = model(x, t, cond, return_uncertainty=True)
    ref = torch.from_numpy(t2i_reference.forward(model, x, t, cond.tokens, cond.mask))
    assert torch.allclose(torch.cat([v, logvar], 1), ref, rtol=1e-9, atol=1e-10), (torch.cat([v, logvar], 1) - ref).abs().max()


def test_padding_is_masked_out():
    model = PatchForcingT2I(**SMALL).double().eval()
    _randomise(model, 3)
    x, t = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.rand(2, 16, dtype=torch.float64)
    cond = _text(2, 4, 12, valid=[4, 2])
    longer = TextCond(torch.cat([cond.tokens, 50 * torch.randn(2, 3, 12, dtype=torch.float64)], 1),
                      torch.cat([cond.mask, torch.zeros(2, 3, dtype=torch.bool)], 1))
    assert torch.allclose(model(x, t, cond), model(x, t, longer), rtol=0, atol=1e-12)
    # ... and the text does condition the output
    other = TextCond(cond.tokens.flip(0), cond.mask)
    assert not torch.allclose(model(x, t, cond), model(x, t, other))


def test_at_initialisation_the_output_is_zero():
    model = PatchForcingT2I(**SMALL)
    v, logvar = model(torch.randn(2, 2, 8, 8), torch.rand(2, 16), _text(2, 3, 12, [3, 1], dtype=torch.float32),
                      return_uncertainty=True)
    assert v.abs().max() == 0 and logvar.abs().max() == 0


def test_deduplicated_conditioning_is_exact():
    model = PatchForcingT2I(**SMALL).eval()
    _randomise(model, 5)
    x = torch.randn(3, 2, 8, 8)
    t = torch.full((3, 16), 0.3)
    t[:, ::3] = 0.7  # two distinct times per sample, as dual-loop and look-ahead give
    t[2] = 0.5  # and one sample at one time
    cond = _text(3, 4, 12, [4, 2, 1], dtype=torch.float32)
    model.dedup_max_distinct = 0
    plain = model(x, t, cond, return_uncertainty=True)
    model.dedup_max_distinct = 8
    assert model.time_table(t) is not None
    dedup = model(x, t, cond, return_uncertainty=True)
    with model.sync_free(distinct_times=2):
        static = model(x, t, cond, return_uncertainty=True)
    for a, b, c in zip(plain, dedup, static):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6) and torch.allclose(a, c, rtol=1e-5, atol=1e-6)
    # a (B,) time is the same as every patch at that time
    s = torch.tensor([0.2, 0.4, 0.9])
    assert torch.allclose(model(x, s, cond), model(x, s[:, None].expand(3, 16).contiguous(), cond), atol=1e-6)


def test_trains():
    model = PatchForcingT2I(**SMALL)
    _randomise(model, 7)
    x, cond = torch.randn(2, 2, 8, 8), _text(2, 3, 12, [3, 2], dtype=torch.float32)
    v, lv = model(x, torch.rand(2, 16), cond, return_uncertainty=True)
    (v.square().mean() + lv.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_presets_and_the_papers_size():
    counts = {}
    for name, build in PF_T2I_models.items():
        with torch.device("meta"):
            counts[name] = num_params(build(in_channels=4, input_size=32, text_dim=384))
    assert 1.1e9 <= counts["PFT2I-1.2B"] <= 1.4e9, counts
    assert counts["PFT2I-Tiny"] < counts["PFT2I-S"] < counts["PFT2I-B"] < counts["PFT2I-1.2B"]
    with pytest.raises(ValueError, match="unknown T2I preset"):
        PF_T2I_models.get("PFT2I-XXL") or __import__("pf.models.presets", fromlist=["x"]).build_t2i("XXL")


@pytest.mark.slow
def test_the_papers_size_runs_one_forward():
    torch.manual_seed(0)
    with torch.device("meta"):  # no 5 GB fp32 initialisation: bf16 storage filled with small weights
        model = PF_T2I_models["PFT2I-1.2B"](in_channels=4, input_size=8, text_dim=384).to(torch.bfloat16)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for b in model.buffers():
            b.normal_()
    cond = TextCond(torch.randn(1, 3, 384, dtype=torch.bfloat16), torch.ones(1, 3, dtype=torch.bool))
    with torch.no_grad():
        v, lv = model(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.rand(1, 16), cond, return_uncertainty=True)
    assert v.shape == (1, 4, 8, 8) and lv.shape == (1, 1, 8, 8) and torch.isfinite(v.float()).all()


def test_checkpoint_round_trip(tmp_path):
    model = PF_T2I_models["PFT2I-Tiny"](in_channels=1, input_size=8, text_dim=12)
    _randomise(model, 9)
    save_checkpoint(model_checkpoint(model), tmp_path / "t2i.pt")
    back = load_checkpoint(tmp_path / "t2i.pt")
    assert type(back) is PatchForcingT2I and back.config() == model.config()
    x, t, cond = torch.randn(1, 1, 8, 8), torch.rand(1, 16), _text(1, 2, 12, [2], dtype=torch.float32)
    assert torch.equal(back(x, t, cond), model.eval()(x, t, cond))  # the Fourier buffer is saved too


@pytest.mark.parametrize("bad,message", [
    (lambda c: torch.zeros(2, dtype=torch.long), r"conditioned on a TextCond"),
    (lambda c: TextCond(c.tokens[..., :5], c.mask), r"text tokens are 5 wide; the model was built for a 12-wide"),
    (lambda c: TextCond(c.tokens, c.mask.float()), r"text mask must be bool"),
    (lambda c: TextCond(c.tokens, c.mask[:, :2]), r"text mask must be \(B, L\)"),
    (lambda c: TextCond(c.tokens[:1], c.mask[:1]), r"the text condition has 1 rows for a batch of 2"),
    (lambda c: TextCond(c.tokens, torch.zeros_like(c.mask)), r"2 text condition\(s\) have no real token"),
])
def test_bad_conditions_are_named(bad, message):
    model = PatchForcingT2I(**SMALL)
    cond = _text(2, 3, 12, [3, 2], dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=message):
        model(torch.randn(2, 2, 8, 8), torch.rand(2, 16), bad(cond))


def test_bad_times_are_named():
    model = PatchForcingT2I(**SMALL)
    cond = _text(2, 3, 12, [3, 2], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"patch times must be finite and lie in \[0, 1\]"):
        model(torch.randn(2, 2, 8, 8), torch.full((2, 16), float("nan")), cond)
    with pytest.raises(ValueError, match=r"t must have shape \(2, 16\)"):
        model(torch.randn(2, 2, 8, 8), torch.rand(2, 15), cond)


def test_traces_whole_under_torch_compile():
    """No graph break and no host read: ``sync_free`` with a static time table, as compile=true samples."""
    model = PatchForcingT2I(**SMALL).eval()
    _randomise(model, 11)
    x = torch.randn(2, 2, 8, 8)
    t = torch.full((2, 16), 0.4)
    t[:, ::2] = 0.6
    cond = _text(2, 3, 12, [3, 2], dtype=torch.float32)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad(), model.sync_free(distinct_times=2):
        got = compiled(x, t, cond, return_uncertainty=True)
    model.dedup_max_distinct = 0
    with torch.no_grad():
        want = model(x, t, cond, return_uncertainty=True)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want))
