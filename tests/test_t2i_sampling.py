"""The samplers call a text model exactly as a class model: guidance puts the empty prompt's
encoding beside the prompts' (padded to one length, padding masked). Checked against the class
path, which tests/test_samplers.py checks against the float64 SPEC reference: a wrapper turns
class ids into the same text conditions, so both runs must give the same samples."""

from __future__ import annotations

import pytest
import torch

from pf import conditioning, samplers
from pf.conditioning import TextCond
from pf.models import PatchForcingT2I

SMALL = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, head_dim=16, text_dim=12,
             text_head_dim=8, cond_width=8)


class ClassesAsText(torch.nn.Module):
    """A class model whose class ``i`` is the text condition ``texts.rows(i)`` (row 0: the empty prompt)."""

    def __init__(self, model: PatchForcingT2I, texts: TextCond):
        super().__init__()
        self.model, self.texts = model, texts
        self.patch_size, self.predict_uncertainty, self.num_classes = model.patch_size, True, 0

    def forward(self, x, t, y, return_uncertainty=False):
        return self.model(x, t, self.texts.rows(y), return_uncertainty=return_uncertainty)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = PatchForcingT2I(**SMALL).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) * 4 + 1 if name.endswith("scale") else torch.randn_like(p) * 0.3)
    g = torch.Generator().manual_seed(1)
    # row 0: the "empty prompt" (2 tokens); rows 1-3: prompts of 5, 3 and 4 tokens
    lengths = [2, 5, 3, 4]
    tokens = torch.randn(4, 5, 12, generator=g, dtype=torch.float64)
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    return model, TextCond(tokens * mask[..., None], mask)


@pytest.mark.parametrize("name,params,cfg", [
    ("euler_pf", {}, 1.0), ("euler_pf", {}, 3.0), ("dual_loop", {"p": 0.4, "n_inner": 2}, 3.0),
    ("look_ahead", {"p": 0.4, "context_t_ratio": 1.4}, 2.5),
])
def test_text_guidance_matches_the_class_path(setup, name, params, cfg):
    model, texts = setup
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ids = torch.tensor([1, 2, 3])
    # the prompts at their own length (4 tokens: the 5-token row is cut to its real ones below
    # only where it is padding), and the empty prompt as one row
    prompts = TextCond(texts.tokens[1:], texts.mask[1:])
    empty = TextCond(texts.tokens[:1, :2], texts.mask[:1, :2])
    via_text = samplers.make(name, **params)(model, x, 6, y=prompts, cfg_scale=cfg, uc_cond=empty)
    via_class = samplers.make(name, **params)(ClassesAsText(model, texts), x, 6, y=ids, cfg_scale=cfg, uc_cond=0)
    assert torch.allclose(via_text, via_class, rtol=1e-10, atol=1e-12)


def test_a_text_model_needs_its_conditions(setup):
    model, texts = setup
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="a text-to-image model needs y"):
        samplers.EulerPF()(model, x, 2)
    with pytest.raises(ValueError, match="needs uc_cond: the empty prompt's encoding"):
        samplers.EulerPF()(model, x, 2, y=texts.rows(slice(1, 2)), cfg_scale=2.0)


def test_cat_pads_and_masks():
    a = TextCond(torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.bool))
    b = TextCond(2 * torch.ones(2, 4, 3), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))
    c = conditioning.cat([a, b])
    assert c.tokens.shape == (3, 4, 3) and c.mask.tolist() == [[True, True, False, False], [True, True, True, False],
                                                               [True, True, True, True]]
    assert c.tokens[0, 2:].abs().sum() == 0
    with pytest.raises(TypeError, match="class labels and text"):
        conditioning.cat([a, torch.zeros(1, dtype=torch.long)])
    with pytest.raises(ValueError, match="must have 1 or 3 rows"):
        conditioning.expand(b, 3)
