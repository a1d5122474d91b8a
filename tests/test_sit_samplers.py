"""SiT's Heun and SDE samplers (SPEC.md section 13): against the independent float64
reference of tests/sit_reference.py on a tiny global-time DiT, and on an analytic 2-D
Gaussian-mixture flow whose exact velocity and target are known (Heun's order, the SDE's
distribution, which a wrong diffusion coefficient visibly breaks)."""

import math

import pytest
import torch

import spec_reference as ref
from model_helpers import TINY, tiny_global_model, tiny_model
from pf import samplers
from pf.pipeline import Pipeline, check_compatible
from pf.samplers import SDE, Euler, Heun
from sit_reference import GaussianMixtureFlow, RefSiT

f64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: threads only contend


def _setup():
    model = tiny_global_model(predict_uncertainty=True)  # its network equals spec_reference.model_forward's
    x = torch.randn(2, 3, 8, 8, dtype=f64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([2, 7])
    sd = model.state_dict()

    def velocity(xx, t, labels):  # the SPEC network in float64, one time per sample
        return ref.model_forward(sd, TINY, xx, torch.full((xx.shape[0],), t, dtype=f64), labels)[0]

    return model, x, y, velocity


def _reference(velocity, y, cfg_scale, interval=None):
    return RefSiT(velocity, y, cfg_scale, interval, null_class=TINY["num_classes"])


@pytest.mark.parametrize("cfg_scale,interval", [(1.0, None), (4.0, None), (4.0, (0.3, 0.6))])
def test_heun_matches_spec_reference(cfg_scale, interval):
    model, x, y, velocity = _setup()
    sampler = Heun()
    out = sampler(model, x, 4, y=y, cfg_scale=cfg_scale, guidance_interval=interval)
    reference = _reference(velocity, y, cfg_scale, interval)
    torch.testing.assert_close(out, reference.heun(x.clone(), 4), rtol=1e-6, atol=1e-9)
    assert sampler.nfe == reference.nfe == sampler.expected_nfe(4) == 8
    guided = {None: 8, (0.3, 0.6): 2}[interval] if cfg_scale != 1.0 else 0  # only s_k = 0.5 guided: 1 step x 2
    assert sampler.guided_nfe == guided


@pytest.mark.parametrize("form,cfg_scale,interval", [("sigma", 1.0, None), ("sigma", 4.0, None),
                                                     ("sigma", 4.0, (0.3, 0.7)), ("sbdm", 1.0, None)])
def test_sde_matches_spec_reference(form, cfg_scale, interval):
    model, x, y, velocity = _setup()
    sampler = SDE(diffusion_form=form, diffusion_norm=0.7, generator=torch.Generator().manual_seed(5))
    out = sampler(model, x, 4, y=y, cfg_scale=cfg_scale, guidance_interval=interval)
    reference = _reference(velocity, y, cfg_scale, interval)
    expected = reference.sde(x.clone(), 4, torch.Generator().manual_seed(5), form=form, norm=0.7)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-9)
    assert sampler.nfe == reference.nfe == sampler.expected_nfe(4) == 4
    if interval is not None:  # t_i = 0, .32, .64, .96: two guided
        assert sampler.guided_nfe == 2
    # the noise matters: another generator state, another result
    other = SDE(diffusion_form=form, diffusion_norm=0.7, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(other(model, x, 4, y=y, cfg_scale=cfg_scale, guidance_interval=interval), out)


def test_sde_per_sample_streams_do_not_depend_on_the_batch():
    model, x, y, _ = _setup()
    x3 = torch.cat([x, torch.randn(1, 3, 8, 8, dtype=f64)])
    y3 = torch.cat([y, torch.tensor([4])])
    together = SDE(seed=3)(model, x3, 5, y=y3)
    alone = SDE(seed=3)(model, x3[1:2], 5, y=y3[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-12, atol=1e-12)
    assert torch.equal(SDE(seed=3)(model, x3, 5, y=y3), together)  # seeded: the same again
    assert not torch.allclose(SDE(seed=4)(model, x3, 5, y=y3), together)
    # the streams differ between samples: two rows with the same noise but for one value diverge
    assert SDE(seed=0).stream_seed(x[0]) != SDE(seed=0).stream_seed(x[1]) != SDE(seed=1).stream_seed(x[1])


# ----------------------------------------------------------------- the analytic flow
FLOW = GaussianMixtureFlow([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]], [0.5, 0.4, 0.6])


def _rk4(flow, x, n):
    """Classical Runge-Kutta with n steps on the exact velocity (the ODE's "exact" end point)."""
    h = 1.0 / n

    def v(z, t):
        return flow(z, torch.full((z.shape[0],), t, dtype=f64))

    for i in range(n):
        t = i * h
        k1 = v(x, t)
        k2 = v(x + h / 2 * k1, t + h / 2)
        k3 = v(x + h / 2 * k2, t + h / 2)
        k4 = v(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_heun_converges_at_second_order_on_the_exact_flow():
    x0 = torch.randn(64, 2, 1, 1, dtype=f64, generator=torch.Generator().manual_seed(3))
    exact = _rk4(FLOW, x0, 256)  # error O(h^4): far below Heun's at 64 steps
    heun = [(Heun()(FLOW, x0, k) - exact).abs().max().item() for k in (16, 32, 64)]
    euler = [(Euler()(FLOW, x0, k) - exact).abs().max().item() for k in (16, 32, 64)]
    heun_order = [math.log2(a / b) for a, b in zip(heun, heun[1:])]
    euler_order = [math.log2(a / b) for a, b in zip(euler, euler[1:])]
    assert all(1.8 < p < 2.3 for p in heun_order), heun_order
    assert all(p < 1.3 for p in euler_order), euler_order  # the check tells first order from second


class _HalfNoise(SDE):
    """A deliberately wrong diffusion: sqrt(w dt) instead of sqrt(2 w dt) (drift kept)."""

    @staticmethod
    def noise_scale(w, dt):
        return math.sqrt(w) * math.sqrt(dt)


def _log_density_z(sampler, n=2000, m=100):
    """z-score of the samples' mean log p_1 against its exact value (400k draws of the target)."""
    target = FLOW.log_density(FLOW.sample_data(400_000, torch.Generator().manual_seed(0)))
    x0 = torch.randn(n, 2, 1, 1, dtype=f64, generator=torch.Generator().manual_seed(100))
    out = sampler(FLOW, x0, m).reshape(n, 2)
    z_logp = (FLOW.log_density(out).mean() - target.mean()) / (target.std() / math.sqrt(n))
    return z_logp.item(), out


def test_sde_samples_the_exact_mixture_and_a_wrong_coefficient_does_not():
    z, out = _log_density_z(SDE(generator=torch.Generator().manual_seed(0)))
    assert abs(z) < 5, z  # the mean log-density of the target, within 5 standard errors
    data = FLOW.sample_data(400_000, torch.Generator().manual_seed(1))
    z_mean = (out.mean(0) - data.mean(0)) / (data.std(0) / math.sqrt(out.shape[0]))
    assert z_mean.abs().max() < 5, z_mean
    z_wrong, _ = _log_density_z(_HalfNoise(generator=torch.Generator().manual_seed(0)))
    assert z_wrong > 10, z_wrong  # too little noise: samples pile up at the modes (z about 16)


# ----------------------------------------------------------------- plumbing
def test_by_name_and_bad_arguments():
    assert isinstance(samplers.make("heun"), Heun) and isinstance(samplers.make("SDE"), SDE)
    model, x, y, _ = _setup()
    for bad in (1, [0.0, 0.5, 1.0]):
        with pytest.raises(ValueError, match="grid points M >= 2"):
            SDE()(model, x, bad, y=y)
    with pytest.raises(ValueError, match="diffusion_form"):
        SDE(diffusion_form="linear")
    with pytest.raises(ValueError, match="last_step_size"):
        SDE(last_step_size=0.0)
    with pytest.raises(ValueError, match="sample_eps"):
        SDE(diffusion_form="SBDM", sample_eps=0.0)


@pytest.mark.parametrize("sampler", [Heun(), SDE()])
def test_global_time_only(sampler):
    with pytest.raises(ValueError, match="is for global-time models; the model holds PatchForcingDiT"):
        check_compatible(tiny_model(), sampler)
    check_compatible(tiny_global_model(), sampler)  # no error
    with pytest.raises(ValueError, match="needs a per-patch-time model.*use sampler=euler, heun or sde"):
        check_compatible(tiny_global_model(), samplers.EulerPF())


def test_sde_refuses_cuda_graphs():
    pipe = Pipeline(tiny_global_model(), SDE())
    pipe.device = torch.device("cuda")  # the check names the sampler before any CUDA work
    with pytest.raises(ValueError, match="SDE cannot run as a CUDA graph"):
        pipe.use_graphs()


# ----------------------------------------------------------------- every command
@pytest.fixture(scope="module")
def sit_ckpt(tmp_path_factory):
    from pf.models.checkpoint import model_checkpoint, save_checkpoint

    path = tmp_path_factory.mktemp("sit") / "sit.ckpt"
    save_checkpoint(model_checkpoint(tiny_global_model(dtype=torch.float32)), path)
    return path


def test_pf_sample_heun_and_sde(sit_ckpt, tmp_path):
    import numpy as np

    from pf import sample

    assert sample.main([f"ckpt={sit_ckpt}", "sampler=heun", "steps=2", "n=2", f"out={tmp_path}", "progress=false"]) == 0
    assert (tmp_path / "heun-steps2-cfg4-seed0.png").is_file()
    dumps = []
    for batch in (1, 3):  # an SDE sample depends on its index and the seed, not on the batch it is drawn in
        out = tmp_path / f"b{batch}"
        assert sample.main([f"ckpt={sit_ckpt}", "sampler=sde", "steps=3", "fid=true", "num=3", f"batch={batch}",
                            f"out={out}", "progress=false"]) == 0
        with np.load(out / "sde-steps3-cfg1-seed0-3.npz") as f:
            dumps.append(f["arr_0"])
    assert dumps[0].shape == (3, 8, 8, 3) and np.array_equal(dumps[0], dumps[1])
    assert _read_like_adm(out / "sde-steps3-cfg1-seed0-3.npz").shape == (3, 8, 8, 3)


def _read_like_adm(path):
    """The way ADM's evaluator opens a sample batch: the zip member ``arr_0.npy`` read as a
    stream (``read_magic``, a 1.0 / 2.0 header, C order, uint8, NHWC with 3 channels)."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path) as z:
        assert "arr_0.npy" in z.namelist()
        with z.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran_order, dtype = read_header(f)
            assert not fortran_order and dtype == np.uint8 and len(shape) == 4 and shape[-1] == 3
            data = np.frombuffer(f.read(), dtype=np.uint8)
    assert data.size == np.prod(shape)
    return data.reshape(shape)


def test_pf_eval_draws_with_heun_and_sde(sit_ckpt):
    from omegaconf import OmegaConf

    from pf.eval.__main__ import DEFAULTS, load_images

    cfg = OmegaConf.create(DEFAULTS)
    cfg.num_samples, cfg.batch_size, cfg.sampler.steps = 2, 2, 3
    for name, nfe in (("heun", 6), ("sde", 3)):
        cfg.sampler.name = name
        images, info = load_images(str(sit_ckpt), cfg, "generated")
        assert images.shape == (2, 3, 8, 8) and info["nfe"] == nfe


def test_heun_never_reads_the_device_on_the_host():
    from pf.sampling.graphs import check_sync_free

    nfe = check_sync_free(Heun(), tiny_global_model(dtype=torch.float32), (2, 3, 8, 8), 3, cfg_scale=2.0)
    assert nfe == 6  # so a whole Heun run can be a CUDA graph


@pytest.mark.parametrize("sampler", [Heun(), SDE()])
def test_no_inpainting(sampler):
    model, x, y, _ = _setup()
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[:, 0] = True
    with pytest.raises(ValueError, match="cannot hold patches fixed"):
        sampler(model, x, 3, y=y, keep=keep, x_cond=torch.zeros_like(x))


# ----------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_graphed_heun_matches_eager(cfg_scale):
    from pf.sampling.graphs import GraphedSampler

    model = tiny_global_model(dtype=torch.float32).cuda()
    graphed = GraphedSampler(Heun(), model, (2, 3, 8, 8), 4, cfg_scale=cfg_scale)
    x = torch.randn(2, 3, 8, 8, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    y = torch.tensor([1, 8], device="cuda")
    eager = Heun()
    torch.testing.assert_close(graphed(x, y), eager(model, x, 4, y=y, cfg_scale=cfg_scale), rtol=1e-4, atol=1e-4)
    assert graphed.nfe == eager.nfe == 8


@pytest.mark.gpu
def test_sde_streams_are_the_same_on_the_gpu():
    model, x, y, _ = _setup()
    model32, x32 = model.float(), x.float()
    cpu = SDE(seed=2)(model32, x32, 6, y=y, cfg_scale=2.0)
    gpu = SDE(seed=2)(model32.cuda(), x32.cuda(), 6, y=y.cuda(), cfg_scale=2.0)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)  # the same noise: only kernel rounding differs
