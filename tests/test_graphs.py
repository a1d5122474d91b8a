"""Graph-capturable samplers: no host reads in a sampler step (meta-device check on the CPU,
sync debug mode and ``torch.cuda.graph`` on a GPU), graphs and compile match eager."""

import pytest
import torch

from model_helpers import tiny_model
from pf import samplers
from pf.samplers import EulerPF, LookAhead
from pf.sampling.graphs import GraphedSampler, check_sync_free, compile_model

SHAPE = (2, 3, 8, 8)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
@pytest.mark.parametrize("name", ["euler_pf", "dual_loop", "look_ahead"])
def test_sampler_step_reads_no_tensor_on_the_host(name, cfg_scale):
    sampler = samplers.make(name)
    nfe = check_sync_free(sampler, tiny_model(dtype=torch.float32), SHAPE, 3, cfg_scale=cfg_scale)
    assert nfe == sampler.expected_nfe(3)


def test_sync_check_with_tensor_uc_cond():
    check_sync_free(LookAhead(), tiny_model(dtype=torch.float32), SHAPE, 3, cfg_scale=2.0, uc_cond=torch.tensor([4]))


class _Leaky(EulerPF):
    """EulerPF plus one host read of a tensor value, in the ways that sneak into samplers."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def run(self, model, x, schedule, y, steps):
        x = super().run(model, x, schedule, y, steps)
        if self.how == "item":
            return x * x.abs().max().item()
        if self.how == "branch":
            return x.clamp(-1, 1) if x.abs().max() > 1 else x  # bool(tensor)
        if self.how == "cpu":
            return x + x.mean().cpu().to(x.device) * 0
        if self.how == "mask":
            return x - x[x > 3].sum()  # a boolean-mask read has a data-dependent shape (nonzero)
        if self.how == "float":
            return x * float(x[0, 0, 0, 0])
        raise AssertionError(self.how)


@pytest.mark.parametrize("how", ["item", "branch", "cpu", "mask", "float"])
def test_sync_check_catches_host_reads(how):
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_sync_free(_Leaky(how), tiny_model(dtype=torch.float32), SHAPE, 2)


def test_sync_check_catches_a_model_outside_sync_free():
    # The eager dedup reads the distinct-time count on the host (one sync per forward):
    # sync_free() is what removes it, so calling the model outside it must be caught.
    class Outside(EulerPF):
        def run(self, model, x, schedule, y, steps):
            model._static_distinct, model._sync_free = None, False
            return super().run(model, x, schedule, y, steps)

    with pytest.raises(RuntimeError, match="meta"):
        check_sync_free(Outside(), tiny_model(dtype=torch.float32), SHAPE, 2)


def test_graphs_need_cuda_and_compile_modes_are_checked():
    model = tiny_model(dtype=torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            GraphedSampler(EulerPF(), model, SHAPE, 2)
    with pytest.raises(ValueError, match="own CUDA graphs"):
        compile_model(model, "reduce-overhead", graphs=True)


@pytest.mark.parametrize("name", ["euler_pf", "look_ahead"])
def test_model_traces_as_one_graph_with_a_static_time_table(name):
    # torch.compile's tracer on the CPU (aot_eager: no C++ compiler needed) with fullgraph=True:
    # the static-width dedup path (K=1 broadcast for EulerPF, the indexed ops for K=2) has no
    # graph break; outside sync_free the compiled model takes the plain path, also unbroken.
    model = tiny_model(dtype=torch.float32)
    x, y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    expected = samplers.make(name)(model, x, 3, y=y, cfg_scale=4.0)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    sampler = samplers.make(name)
    with model.sync_free(distinct_times=sampler.max_distinct_times):
        torch.testing.assert_close(sampler(compiled, x, 3, y=y, cfg_scale=4.0), expected, rtol=1e-5, atol=1e-5)
    t = torch.full((2, 16), 0.5)
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-5)


#################################################################################
#                                    GPU                                        #
#################################################################################


def _cuda_setup(seed=0):
    model = tiny_model(dtype=torch.float32, seed=seed).cuda()
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(SHAPE, device="cuda", generator=g)
    y = torch.tensor([2, 7], device="cuda")
    return model, x, y


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["euler_pf", "dual_loop", "look_ahead"])
def test_eager_step_does_not_sync_on_cuda(name):
    model, x, y = _cuda_setup()
    sampler = samplers.make(name)
    sampler(model, x, 3, y=y, cfg_scale=4.0)  # warm-up: Triton JIT, allocator
    torch.cuda.synchronize()
    with model.sync_free(distinct_times=sampler.max_distinct_times):
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampler(model, x, 3, y=y, cfg_scale=4.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
@pytest.mark.parametrize("name", ["euler_pf", "dual_loop", "look_ahead"])
def test_graphed_sampler_matches_eager_and_replays(name, cfg_scale):
    model, x, y = _cuda_setup()
    graphed = GraphedSampler(samplers.make(name), model, SHAPE, 5, cfg_scale=cfg_scale)
    for seed in (0, 1):  # a second replay with new noise and labels
        x = torch.randn(SHAPE, device="cuda", generator=torch.Generator(device="cuda").manual_seed(10 + seed))
        y = torch.tensor([seed, 9 - seed], device="cuda")
        eager = samplers.make(name)
        expected = eager(model, x, 5, y=y, cfg_scale=cfg_scale)
        torch.testing.assert_close(graphed(x, y), expected, rtol=1e-4, atol=1e-4)
        assert graphed.nfe == eager.nfe


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_compiled_model_matches_eager(graphs):
    model, x, y = _cuda_setup()
    expected = LookAhead()(model, x, 4, y=y, cfg_scale=4.0)
    compiled = compile_model(model, "default", graphs=graphs)
    if graphs:
        out = GraphedSampler(LookAhead(), compiled, SHAPE, 4, cfg_scale=4.0)(x, y)
    else:
        with model.sync_free(distinct_times=LookAhead.max_distinct_times):
            out = LookAhead()(compiled, x, 4, y=y, cfg_scale=4.0)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
