"""Per-patch schedules and kept patches (SPEC.md section 12) against the independent float64
reference of tests/spec_reference.py, and their exact agreements with EulerPF."""

import pytest
import torch

import spec_reference as ref
from model_helpers import TINY, tiny_model
from pf.flow import time_to_pixels
from pf.samplers import DualLoop, Euler, EulerPF, LookAhead, Scheduled
from pf.samplers.base import below_pixel_quantile
from pf.sampling.graphs import check_sync_free

N = 16  # tiny model: 8x8 pixels, patch 2


def _setup(seed=0, dtype=torch.float64):
    model = tiny_model(seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 3, 8, 8, dtype=dtype, generator=g)
    x_cond = torch.randn(2, 3, 8, 8, dtype=dtype, generator=g).clamp(-1, 1)
    return model, x, x_cond, torch.tensor([2, 7])


def _hand_schedule() -> torch.Tensor:
    """(B=2, K+1=5, N=16): kept patches (ones), late starters, patches that wait then catch up."""
    s = torch.zeros(2, 5, N)
    s[0] = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])[:, None]  # sample 0: the uniform grid ...
    s[0, :, :4] = 1.0  # ... with its first grid row kept
    s[0, :, 4:6] = torch.tensor([0.3, 0.3, 0.6, 0.9, 1.0])[:, None]  # starts part-way, waits a step
    s[1] = torch.tensor([0.0, 0.1, 0.2, 0.7, 1.0])[:, None]  # sample 1: an uneven grid ...
    s[1, :, 10:] = torch.tensor([0.5, 0.8, 0.8, 1.0, 1.0])[:, None]  # ... some patches ahead, done early
    s[1, :, 15] = torch.tensor([0.0, 0.05, 0.2, 0.2, 1.0])  # one patch lags, waits, then one jump
    return s


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("cfg_scale,interval", [(1.0, None), (3.0, None), (3.0, (0.1, 0.5))])
def test_scheduled_matches_spec_reference_on_a_hand_made_schedule(cfg_scale, interval):
    model, x, x_cond, y = _setup()
    table = _hand_schedule()
    sampler = Scheduled()
    out = sampler(model, x, table, x_cond=x_cond, y=y, cfg_scale=cfg_scale, guidance_interval=interval)
    reference = ref.RefSampler(model.state_dict(), TINY, y, cfg_scale, interval)
    expected = reference.scheduled(x.clone(), table, x_cond)
    assert _rel(out, expected) < 1e-6
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-9)
    assert sampler.nfe == reference.nfe == 4
    if interval is not None:  # earliest times per step 0, 0.05, 0.2, 0.2: steps 2 and 3 guided
        assert sampler.guided_nfe == 2
    kept = time_to_pixels(table[:, 0] == 1.0, 2, 8, 8).expand_as(x)  # sample 0's kept row: exact
    assert torch.equal(out[kept], x_cond[kept])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_grid_equals_euler_pf_exactly(dtype):
    model, x, _, y = _setup(dtype=dtype)
    grid = torch.linspace(0, 1, 7, dtype=torch.float32)[:, None].expand(7, N)
    euler = EulerPF()(model, x, 6, y=y, cfg_scale=2.5, guidance_interval=(0.2, 0.8))
    assert torch.equal(Scheduled()(model, x, grid, y=y, cfg_scale=2.5, guidance_interval=(0.2, 0.8)), euler)
    assert torch.equal(Scheduled()(model, x, 6, y=y, cfg_scale=2.5, guidance_interval=(0.2, 0.8)), euler)


def _keep():
    keep = torch.zeros(2, N, dtype=torch.bool)
    keep[0, :8] = True  # top half of sample 0
    keep[1, ::3] = True
    return keep


def test_euler_pf_with_kept_patches_is_the_schedule_of_ones_and_the_grid():
    model, x, x_cond, y = _setup(dtype=torch.float32)
    keep = _keep()
    grid = torch.linspace(0, 1, 5, dtype=torch.float32)
    table = torch.where(keep[:, None, :], 1.0, grid[None, :, None].expand(2, 5, N))  # (B, K+1, N)
    a = EulerPF()(model, x, 4, y=y, keep=keep, x_cond=x_cond, cfg_scale=2.0)
    b = Scheduled()(model, x, table, y=y, x_cond=x_cond, cfg_scale=2.0)
    assert torch.equal(a, b)
    kept = time_to_pixels(keep, 2, 8, 8).expand_as(x)
    assert torch.equal(a[kept], x_cond[kept])


@pytest.mark.parametrize("name", ["dual_loop", "look_ahead"])
def test_adaptive_samplers_with_kept_patches_match_spec_reference(name):
    model, x, x_cond, y = _setup()
    keep = _keep()
    sampler = DualLoop() if name == "dual_loop" else LookAhead()
    out = sampler(model, x, 4, y=y, cfg_scale=2.0, keep=keep, x_cond=x_cond)
    kept = time_to_pixels(keep, 2, 8, 8).to(torch.float64)  # (B, 1, H, W)
    reference = ref.RefSampler(model.state_dict(), TINY, y, 2.0)
    expected = getattr(reference, name)(x.clone(), 4, kept=kept, x_cond=x_cond)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-9)
    assert torch.equal(out[kept.bool().expand_as(x)], x_cond[kept.bool().expand_as(x)])
    assert sampler.nfe == reference.nfe


def test_masked_quantile_orders_the_free_patches_only():
    scores = torch.rand(3, N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    none_kept = torch.zeros(3, N, dtype=torch.bool)
    assert torch.equal(below_pixel_quantile(scores, 4, 0.4, none_kept), below_pixel_quantile(scores, 4, 0.4))
    keep = torch.zeros(3, N, dtype=torch.bool)
    keep[0, :8], keep[2] = True, True  # sample 2: everything kept
    got = below_pixel_quantile(scores, 4, 0.5, keep)
    free = scores[0, 8:].repeat_interleave(4)
    assert torch.equal(got[0], torch.cat([torch.zeros(8, dtype=torch.bool), scores[0, 8:] < free.quantile(0.5)]))
    assert not got[2].any()


class _Velocity(torch.nn.Module):
    """A global-time stand-in: v = y-dependent constant minus x, so replacement is checkable by hand."""

    per_token, predict_uncertainty, patch_size, num_classes = False, False, 2, 10

    def forward(self, x, t, y, return_uncertainty=False):
        self.seen = getattr(self, "seen", []) + [x.clone()]
        return 0.5 - x + t[:, None, None, None]


def test_euler_replacement_as_spec_says():
    _, x, x_cond, y = _setup()
    keep = _keep()
    model = _Velocity()
    out = Euler(replacement_seed=3)(model, x, 4, y=y, keep=keep, x_cond=x_cond)
    kept = time_to_pixels(keep, 2, 8, 8).expand_as(x)
    noise, xr = torch.Generator().manual_seed(3), x.clone()
    s = torch.linspace(0, 1, 5, dtype=torch.float32).tolist()
    for k in range(4):
        eps = torch.randn(x.shape, generator=noise, dtype=x.dtype)
        xr = torch.where(kept, s[k] * x_cond + (1 - s[k]) * eps, xr)
        assert torch.equal(model.seen[k], xr)  # the model sees the re-noised kept region
        xr = xr + (s[k + 1] - s[k]) * (0.5 - xr + s[k])
    torch.testing.assert_close(out[~kept], xr[~kept])
    assert torch.equal(out[kept], x_cond[kept])


@pytest.mark.parametrize("table,match", [
    (torch.zeros(5, N - 1), r"\(K\+1, N\)"),
    (torch.zeros(1, N), r"K >= 1"),
    (torch.zeros(3, 5, N), r"B = 2"),
    (torch.linspace(0, 1.5, 5)[:, None].expand(5, N), r"\[0, 1\]"),
    (torch.full((5, N), float("nan")), r"\[0, 1\]"),
    (torch.tensor([0.0, 0.5, 0.4, 1.0, 1.0])[:, None].expand(5, N), "non-decreasing"),
    (torch.full((5, N), 0.5), "x_cond"),
])
def test_bad_schedules_get_one_line(table, match):
    model, x, _, y = _setup()
    with pytest.raises(ValueError, match=match) as err:
        Scheduled()(model, x, table, y=y)
    assert "\n" not in str(err.value)


def test_bad_keep_and_x_cond():
    model, x, x_cond, y = _setup()
    with pytest.raises(ValueError, match="needs x_cond"):
        EulerPF()(model, x, 2, y=y, keep=_keep())
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        EulerPF()(model, x, 2, y=y, keep=torch.ones(2, 4, dtype=torch.bool), x_cond=x_cond)
    with pytest.raises(ValueError, match="needs keep"):
        DualLoop()(model, x, 2, y=y, x_cond=x_cond)
    with pytest.raises(ValueError, match="all ones"):
        Scheduled()(model, x, 2, y=y, keep=_keep(), x_cond=x_cond)


def test_distinct_times_and_sync_free_on_meta():
    table = _hand_schedule()
    assert Scheduled().distinct_times(table) == 3  # e.g. sample 0, step 1: 1 (kept), 0.3, 0.25
    assert EulerPF().distinct_times(4, keep=True) == 2 and DualLoop().distinct_times(4, keep=True) == 3
    model = tiny_model(dtype=torch.float32)
    assert check_sync_free(Scheduled(), model, (2, 3, 8, 8), table, cfg_scale=2.0, x_cond=True) == 4
    assert check_sync_free(LookAhead(), model, (2, 3, 8, 8), 4, cfg_scale=2.0, keep=True) == 7
    assert check_sync_free(DualLoop(), model, (2, 3, 8, 8), 2, keep=True) == 8


def test_a_sampler_without_kept_patches_refuses_them():
    from pf.samplers import SAMPLERS

    _, x, x_cond, y = _setup()
    others = [cls for cls in SAMPLERS.values() if not cls.supports_keep and cls is not Scheduled]
    assert others  # SiT's Heun and SDE samplers: without the check, silently wrong results
    for cls in others:
        with pytest.raises(ValueError, match="cannot hold patches fixed"):
            cls()(_Velocity(), x, 2, y=y, keep=_keep(), x_cond=x_cond)
