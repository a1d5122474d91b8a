"""Deduplicated conditioning: the (B, K) time table, and the model and every sampler giving
the plain per-token result through it (eager with one sync, static inside sync_free)."""

import pytest
import torch

import pf_kernels
from model_helpers import tiny_model
from pf import samplers
from pf.models.dedup import time_table
from kernel_cases import needs_interp


def _times(b=3, n=16, seed=0, dtype=torch.float32):
    """Per-patch times with 1, 2 and 3 distinct values in the rows."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((b, n), 0.3, dtype=dtype)
    t[1, torch.randperm(n, generator=g)[:5]] = 0.7
    t[2, torch.randperm(n, generator=g)[:4]] = 0.1
    t[2, torch.randperm(n, generator=g)[:3]] = 0.95
    return t


def _inputs(b=3, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 8, 8, generator=g, dtype=dtype), torch.tensor([1, 10, 4, 7, 0, 2][:b])


def _plain(model):
    class Plain:
        def __enter__(self):
            self.saved = model.dedup_max_distinct
            model.dedup_max_distinct = 0

        def __exit__(self, *exc):
            model.dedup_max_distinct = self.saved

    return Plain()


def test_time_table_rows_and_index():
    t = _times()
    tab = time_table(t, 3)
    assert tab.times.shape == (3, 3) and tab.index.shape == (3, 16) and tab.index.dtype == torch.int64
    assert torch.equal(tab.times.gather(1, tab.index), t)  # every token finds its time
    assert tab.times[0].tolist() == pytest.approx([0.3, 0.3, 0.3])  # padded with the largest
    assert tab.times[2].tolist() == pytest.approx([0.1, 0.3, 0.95])
    assert int(tab.index.max()) <= 2


def test_time_table_matches_unique_on_random_rows():
    g = torch.Generator().manual_seed(3)
    levels = torch.rand(5, 4, generator=g)
    t = levels.gather(1, torch.randint(0, 4, (5, 64), generator=g))  # up to 4 distinct per row
    tab = time_table(t, 4)
    assert torch.equal(tab.times.gather(1, tab.index), t)
    for b in range(5):
        assert set(tab.times[b].tolist()) == set(torch.unique(t[b]).tolist())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_forward_dedup_equals_plain(dtype, tol):
    model = tiny_model(dtype=dtype)
    x, y = _inputs(dtype=dtype)
    for t in (_times(dtype=dtype), torch.full((3, 16), 0.42, dtype=dtype), torch.rand(3, dtype=dtype)):
        assert t.dim() == 1 or model.time_table(t) is not None  # the dedup path really runs
        v, lv = model(x, t, y, return_uncertainty=True)
        with _plain(model):
            assert model.time_table(t) is None
            v0, lv0 = model(x, t, y, return_uncertainty=True)
        torch.testing.assert_close(v, v0, rtol=tol, atol=tol)
        torch.testing.assert_close(lv, lv0, rtol=tol, atol=tol)


def test_static_table_width_equals_plain_and_no_sync_path():
    model = tiny_model(dtype=torch.float32)
    x, y = _inputs()
    t = _times()
    with _plain(model):
        v0 = model(x, t, y)
    for k in (3, 5):  # at least the true distinct count; extra rows are padding
        with model.sync_free(distinct_times=k):
            assert model.time_table(t).times.shape == (3, k)
            torch.testing.assert_close(model(x, t, y), v0, rtol=1e-5, atol=1e-5)
    with model.sync_free():  # no K given: the plain path, still without host reads
        assert model.time_table(t) is None
        torch.testing.assert_close(model(x, t, y), v0, rtol=1e-5, atol=1e-5)
    assert model._static_distinct is None and not model._sync_free  # restored on exit
    with pytest.raises(ValueError, match="distinct_times"):
        with model.sync_free(distinct_times=0):
            pass


def test_dedup_only_when_it_pays_and_not_in_training():
    model = tiny_model(dtype=torch.float32)
    t = _times()
    assert model.time_table(t).times.shape == (3, 3)
    assert model.time_table(torch.rand(3, 16)) is None  # 16 distinct times of 16 tokens: plain
    model.train()
    assert model.time_table(t) is None  # training keeps the plain per-token path
    model.eval()
    model.dedup_max_distinct = 2
    assert model.time_table(t) is None  # 3 distinct > the cap


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
@pytest.mark.parametrize("name", ["euler_pf", "dual_loop", "look_ahead"])
def test_samplers_dedup_equal_plain(name, cfg_scale):
    model = tiny_model(dtype=torch.float32)
    x, y = _inputs(b=2)
    out = samplers.make(name)(model, x, 4, y=y, cfg_scale=cfg_scale)
    with _plain(model):
        plain = samplers.make(name)(model, x, 4, y=y, cfg_scale=cfg_scale)
    sampler = samplers.make(name)
    with model.sync_free(distinct_times=sampler.max_distinct_times):
        static = sampler(model, x, 4, y=y, cfg_scale=cfg_scale)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(static, plain, rtol=1e-5, atol=1e-5)


@needs_interp
def test_indexed_kernels_in_the_model_under_the_interpreter(triton_backend, monkeypatch):
    model = tiny_model(dtype=torch.float32)
    x, y = _inputs()
    t = _times()
    calls = []
    for name in ("adaln_modulate_indexed", "gated_residual_modulate_indexed"):
        real = getattr(pf_kernels, name)
        monkeypatch.setattr(pf_kernels, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    v, lv = model(x, t, y, return_uncertainty=True)
    assert len(calls) == 2 * model.depth + 1  # the first block's input, then two fused calls per block
    pf_kernels.set_backend("torch")
    with _plain(model):
        v0, lv0 = model(x, t, y, return_uncertainty=True)
    torch.testing.assert_close(v, v0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lv, lv0, rtol=1e-4, atol=1e-5)
