"""The samplers against the independent float64 implementation of SPEC sections 5 and 6."""

import pytest
import torch

import spec_reference as ref
from model_helpers import TINY, tiny_global_model, tiny_model
from pf import samplers
from pf.samplers import DualLoop, Euler, EulerPF, LookAhead, certain_patches

K = 6  # outer steps: look-ahead's warm-up (s_k <= 0.05) covers s_0 only


def _setup(seed=0):
    model = tiny_model(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    y = torch.tensor([2, 7])
    return model, x, y


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
@pytest.mark.parametrize("name", ["euler_pf", "dual_loop", "look_ahead"])
def test_sampler_matches_spec_reference(name, cfg_scale):
    model, x, y = _setup()
    sampler = samplers.make(name)
    out = sampler(model, x, K, y=y, cfg_scale=cfg_scale)
    reference = ref.RefSampler(model.state_dict(), TINY, y, cfg_scale)
    expected = getattr(reference, name)(x.clone(), K)
    assert _rel(out, expected) < 1e-6
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-9)
    assert sampler.nfe == reference.nfe == sampler.expected_nfe(K)


def test_adaptive_samplers_really_split_patches():
    # Guard against a degenerate test: the map must mark some patches certain and some not.
    model, x, y = _setup()
    _, lv = model(x, torch.full((2, 16), 0.3, dtype=torch.float64), y, return_uncertainty=True)
    cert = certain_patches(lv, 2, 0.4)
    assert 0 < cert.sum(1).min() and cert.sum(1).max() < 16
    # and it differs from EulerPF on the same noise
    assert _rel(DualLoop()(model, x, K, y=y), EulerPF()(model, x, K, y=y)) > 1e-4


def test_certain_patches_quantile_over_pixels():
    lv = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).reshape(1, 1, 2, 2)
    lv = lv.repeat_interleave(2, 2).repeat_interleave(2, 3)  # 4 patches of 2x2 pixels
    # 16 pixels: quantile 0.4 at position 6 -> value 2.0; strict compare -> only the first patch
    assert certain_patches(lv, 2, 0.4).tolist() == [[True, False, False, False]]
    assert certain_patches(lv, 2, 0.5).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("sampler,nfe", [(EulerPF(), 10), (DualLoop(n_inner=3), 30), (LookAhead(), 19), (Euler(), 10)])
def test_nfe_as_spec_says(sampler, nfe):
    model, x, y = _setup()
    if isinstance(sampler, Euler):
        model = tiny_global_model()
    sampler(model, x, 10, y=y, cfg_scale=2.0)
    assert sampler.nfe == nfe == sampler.expected_nfe(10)


class _TimeRecorder(torch.nn.Module):
    """A fake model that records the patch times it is called with."""

    per_token = True
    predict_uncertainty = True
    patch_size = 2
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.times = []

    def forward(self, x, t, y, return_uncertainty=False):
        self.times.append(t.clone())
        b, _, h, w = x.shape
        v = torch.zeros_like(x)
        lv = torch.arange(h * w, dtype=x.dtype).reshape(1, 1, h, w).expand(b, 1, h, w)
        return (v, lv) if return_uncertainty else v


def test_dual_loop_inner_times_and_end_at_one():
    rec = _TimeRecorder()
    DualLoop(p=0.4, n_inner=4)(rec, torch.zeros(1, 3, 8, 8), 2, y=torch.tensor([0]))
    times = torch.stack(rec.times)[:, 0]  # (8 calls, 16 patches)
    assert torch.allclose(times[0], torch.zeros(16))
    certain = times[1] == 0.5
    assert certain.sum() == 6  # 40% of 16 patches by the pixel quantile
    assert torch.allclose(times[1][~certain], torch.full((10,), 0.125))
    assert torch.allclose(times[3][~certain], torch.full((10,), 0.375))
    assert torch.allclose(times[4], torch.full((16,), 0.5))  # everybody at s_1 for the next outer step
    # every patch ends at t = 1: the last inner call sees uncertain patches at 1 - dt/n_inner
    assert torch.allclose(times[-1][~certain], torch.full((10,), 0.875))
    assert torch.allclose(times[-1][certain], torch.ones(6))


def test_look_ahead_context_times():
    rec = _TimeRecorder()
    LookAhead(p=0.4, context_t_ratio=1.4)(rec, torch.zeros(1, 3, 8, 8), 4, y=torch.tensor([0]))
    times = torch.stack(rec.times)[:, 0]
    assert len(times) == 7  # 1 warm-up call at s=0, then 2 per step
    ctx = times[2]  # context call at s_1 = 0.25: certain patches at 0.35
    assert torch.allclose(ctx.max(), torch.tensor(0.35)) and torch.allclose(ctx.min(), torch.tensor(0.25))
    assert torch.allclose(times[-1].max(), torch.tensor(1.0))  # min(0.75 * 1.4, 1)


@pytest.mark.parametrize("factory,match", [
    (lambda: DualLoop(p=0.0), r"\(0, 1\)"), (lambda: DualLoop(p=1.5), r"\(0, 1\)"),
    (lambda: LookAhead(p=-0.1), r"\(0, 1\)"), (lambda: DualLoop(n_inner=0), "n_inner"),
    (lambda: samplers.make("rk45"), "unknown sampler"),
])
def test_bad_sampler_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_guidance_needs_labels_and_uncertainty_head():
    model, x, _ = _setup()
    with pytest.raises(ValueError, match="needs class labels"):
        EulerPF()(model, x, 2, cfg_scale=3.0)
    with pytest.raises(ValueError, match="difficulty head"):
        DualLoop()(tiny_global_model(), x, 2, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least one sampling step"):
        EulerPF()(model, x, 0)


def test_uc_cond_replaces_null_label():
    model, x, y = _setup()
    a = EulerPF()(model, x, 3, y=y, cfg_scale=2.0, uc_cond=torch.tensor([5, 5]))
    b = EulerPF()(model, x, 3, y=y, cfg_scale=2.0)
    c = EulerPF()(model, x, 3, y=y, cfg_scale=2.0, uc_cond=10)
    assert _rel(a, b) > 1e-6
    torch.testing.assert_close(b, c)


# ------------------------------------------------------ patch selection (ablations)
def _brute_lowest(scores: torch.Tensor, area: int, p: float) -> torch.Tensor:
    """Independent: numpy's quantile over the pixel-repeated scores, strict compare."""
    import numpy as np

    out = []
    for row in scores.double().numpy():
        q = np.quantile(np.repeat(row, area), p)  # linear interpolation
        out.append(row < q)
    return torch.as_tensor(np.stack(out))


def test_selection_rules_move_the_chosen_patches():
    from pf.samplers.base import PatchSelection, below_pixel_quantile

    lv = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).reshape(1, 1, 2, 2)
    lv = lv.repeat_interleave(2, 2).repeat_interleave(2, 3)  # 4 patches of 2x2 pixels
    assert PatchSelection("uncertainty")(lv, 2, 0.5).tolist() == [[True, True, False, False]]
    assert PatchSelection("most_uncertain")(lv, 2, 0.5).tolist() == [[False, False, True, True]]
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 37, generator=g, dtype=torch.float64)
    for p in (0.1, 0.4, 0.77):
        assert torch.equal(below_pixel_quantile(scores, 4, p), _brute_lowest(scores, 4, p))


def test_random_selection_keeps_the_count_and_is_seeded():
    from pf.samplers.base import PatchSelection

    model, x, y = _setup()
    _, lv = model(x, torch.full((2, 16), 0.3, dtype=torch.float64), y, return_uncertainty=True)
    base = PatchSelection("uncertainty")(lv, 2, 0.4)
    picks = []
    for seed in (0, 0, 1):
        sel = PatchSelection("random", seed)
        sel.reset(x.device)
        picks.append(sel(lv, 2, 0.4))
        assert torch.equal(picks[-1].sum(1), base.sum(1))  # as many patches as the method moves
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])
    with pytest.raises(ValueError, match=r"selection must be one of"):
        PatchSelection("largest")


@pytest.mark.parametrize("cls", [DualLoop, LookAhead])
def test_selection_changes_the_run_and_random_is_reproducible(cls):
    model, x, y = _setup()
    default = cls()(model, x, K, y=y)
    rand_a = cls(selection="random", selection_seed=5)(model, x, K, y=y)
    rand_b = cls(selection="random", selection_seed=5)(model, x, K, y=y)
    worst = cls(selection="most_uncertain")(model, x, K, y=y)
    assert torch.equal(rand_a, rand_b)
    assert _rel(rand_a, default) > 1e-6 and _rel(worst, default) > 1e-6


@pytest.mark.parametrize("timesteps", [[0.0, 0.5, 2.0], [-0.5, 0.5, 1.0], [0.0, float("nan"), 1.0]])
def test_a_schedule_outside_zero_one_is_refused(timesteps):
    model, x, y = _setup()
    with pytest.raises(ValueError, match=r"timesteps must be|finite times in \[0, 1\]"):
        EulerPF()(model, x, timesteps, y=y)


# ------------------------------------------------------------- guidance interval (SPEC 10)
@pytest.mark.parametrize("name", ["euler_pf", "dual_loop", "look_ahead"])
def test_guidance_interval_matches_spec_reference(name):
    model, x, y = _setup()
    interval = (0.3, 0.7)  # K = 6: s_k = 1/3 and 1/2 are guided, the rest unguided
    sampler = samplers.make(name)
    out = sampler(model, x, K, y=y, cfg_scale=4.0, guidance_interval=interval)
    reference = ref.RefSampler(model.state_dict(), TINY, y, 4.0, interval=interval)
    expected = getattr(reference, name)(x.clone(), K)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-9)
    assert sampler.nfe == reference.nfe and 0 < sampler.guided_nfe < sampler.nfe


@pytest.mark.parametrize("name", ["euler_pf", "dual_loop", "look_ahead"])
def test_interval_over_every_step_is_plain_cfg_and_over_none_is_no_guidance(name):
    model, x, y = _setup()
    plain = samplers.make(name)(model, x, K, y=y, cfg_scale=4.0)
    every = samplers.make(name)
    assert torch.equal(every(model, x, K, y=y, cfg_scale=4.0, guidance_interval=(0.0, 1.0)), plain)
    assert every.guided_nfe == every.nfe
    none = samplers.make(name)
    unguided = samplers.make(name)(model, x, K, y=y, cfg_scale=1.0)
    assert torch.equal(none(model, x, K, y=y, cfg_scale=4.0, guidance_interval=(0.4, 0.45)), unguided)
    assert none.guided_nfe == 0 and none.nfe == every.nfe


def test_guided_steps_on_the_host_schedule_and_bad_intervals():
    from pf.samplers.base import guided_steps, outer_schedule

    s = outer_schedule(4)  # 0, .25, .5, .75, 1
    assert guided_steps(s, 4.0, None) == [True] * 4 and guided_steps(s, 1.0, (0, 1)) == [False] * 4
    assert guided_steps(s, 4.0, (0.25, 0.5)) == [False, True, True, False]  # both ends included
    for bad in ((0.6, 0.4), (-0.1, 0.5), (0.2,), "ab"):
        with pytest.raises(ValueError, match="guidance_interval"):
            guided_steps(s, 4.0, bad)
        with pytest.raises(ValueError, match="guidance_interval"):
            guided_steps(s, 1.0, bad)  # checked even when nothing would be guided
