"""ADM's evaluation suite (pf.eval.adm, pf.eval.inception): the Frechet distance and the
Inception Score against closed forms, precision/recall against a brute-force count, and
``python -m pf.eval ... extractor=inception`` end to end, offline, on a small hand-made
reference batch with randomly initialised Inception weights saved to a file."""

import json
import math

import numpy as np
import pytest
import torch

from pf import cli
from pf.eval import adm
from pf.eval.adm import Gaussian

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- closed forms
def test_frechet_distance_of_commuting_gaussians():
    rng = np.random.default_rng(0)
    d = 40
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # a shared eigenbasis: the covariances commute
    l1, l2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum()
    assert adm.frechet_distance(Gaussian(mu1, s1), Gaussian(mu2, s2)) == pytest.approx(expected, rel=1e-10)
    assert adm.frechet_distance(Gaussian(mu1, s1), Gaussian(mu1, s1)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_of_non_commuting_2d_gaussians():
    # 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M with positive eigenvalues, M = S1 S2
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[0.5, -0.2], [-0.2, 1.5]])
    m = s1 @ s2
    tr_root = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.array([1.0, -1.0]), np.array([0.0, 0.5])
    expected = 1.0 + 2.25 + np.trace(s1) + np.trace(s2) - 2 * tr_root
    assert adm.frechet_distance(Gaussian(mu1, s1), Gaussian(mu2, s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_rank_deficient_sample_covariances_matches_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = adm.fit_gaussian(rng.normal(size=(30, 64))), adm.fit_gaussian(rng.normal(1, 2, size=(25, 64)))
    root = linalg.sqrtm(a.sigma @ b.sigma).real  # the formula the usual evaluators evaluate
    expected = ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(root)
    assert a.factor is not None and b.factor is not None  # fewer vectors than dimensions: the (N, N) route
    assert adm.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    full = adm.frechet_distance(Gaussian(a.mu, a.sigma), Gaussian(b.mu, b.sigma))  # the (D, D) route
    assert full == pytest.approx(expected, rel=1e-6)
    assert adm.frechet_distance(a, Gaussian(b.mu, b.sigma)) == pytest.approx(expected, rel=1e-6)


def test_inception_score_of_known_probabilities():
    a, n = 0.9, 40
    p = np.array([[a, 1 - a], [1 - a, a]] * (n // 2))  # every split of 4 holds both kinds: p(y) = (1/2, 1/2)
    expected = math.exp(a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    assert adm.inception_score(np.log(p)) == pytest.approx(expected, rel=1e-12)
    assert adm.inception_score(np.log(p) + 3.0) == pytest.approx(expected, rel=1e-12)  # logits up to a constant
    assert adm.inception_score(np.zeros((20, 7))) == pytest.approx(1.0)  # uniform: no information
    one_hot = np.full((50, 5), -1e3)
    one_hot[np.arange(50), np.arange(50) % 5] = 0.0  # confident and balanced over 5 classes in every split
    assert adm.inception_score(one_hot) == pytest.approx(5.0, rel=1e-9)
    with pytest.raises(ValueError, match="10 splits need at least 10"):
        adm.inception_score(np.zeros((9, 3)))


def _brute_precision(ref, gen, k):
    """Share of gen points within the k-NN ball of some reference point: plain loops."""
    def dist2(u, v):
        return sum((x - y) ** 2 for x, y in zip(u, v))

    radii = [sorted(dist2(r, o) for j, o in enumerate(ref) if j != i)[k - 1] for i, r in enumerate(ref)]
    return sum(any(dist2(g, r) <= rad for r, rad in zip(ref, radii)) for g in gen) / len(gen)


def test_precision_recall_against_brute_force_and_a_hand_case():
    # hand case, 1-D: reference 0, 1, 2, 3 (k = 3 radii 3, 2, 2, 3); samples 4.5 (inside 2's ball
    # of radius 2: |4.5 - 2| = 2.5 > 2, inside 3's of radius 3: 1.5 <= 3) and 7 (outside all)
    ref = np.array([[0.0], [1.0], [2.0], [3.0]])
    gen = np.array([[4.5], [7.0], [0.5], [1.5]])
    precision, _ = adm.precision_recall(ref, gen, k=3)
    assert precision == 0.75
    rng = np.random.default_rng(2)
    r, g = rng.normal(size=(40, 5)), rng.normal(0.5, 1.3, size=(33, 5))
    p, rc = adm.precision_recall(r, g, k=3, block=7)
    assert p == pytest.approx(_brute_precision(r.tolist(), g.tolist(), 3))
    assert rc == pytest.approx(_brute_precision(g.tolist(), r.tolist(), 3))
    assert 0 < p < 1 and 0 < rc < 1


# ----------------------------------------------------------------- offline, end to end
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from pf.eval.inception import random_inception_weights

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return random_inception_weights(tmp_path_factory.mktemp("inception") / "inception-random.pth")
    finally:
        torch.set_num_threads(previous)


def _images(n, seed, shift=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 8, 8, 3), generator=g, dtype=torch.int32) + shift
    return x.clamp(0, 255).to(torch.uint8).numpy()


def test_pf_eval_prints_adm_metrics_and_stored_statistics_equal_the_images(inception_file, tmp_path, capsys):
    from pf.eval.__main__ import DEFAULTS, main

    np.savez(tmp_path / "samples.npz", arr_0=_images(10, 0, shift=40))
    np.savez(tmp_path / "ref.npz", arr_0=_images(10, 1))
    cache = tmp_path / "cache"
    common = [f"generated={tmp_path / 'samples.npz'}", "extractor=inception",
              f"feature_extractor_weights_path={inception_file}", f"stats_cache={cache}", "device=cpu"]
    assert cli.run(main, DEFAULTS, "doc", argv=[*common, f"reference={tmp_path / 'ref.npz'}"]) == 0
    out, err = capsys.readouterr()
    arrays = json.loads(out)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert math.isfinite(arrays[key]), key
    assert arrays["fid"] > 0 and arrays["sfid"] > 0 and arrays["reference"]["statistics"] == "computed"
    assert all(name in err for name in ("FID", "sFID", "IS", "precision", "recall"))
    (cached,) = cache.iterdir()  # the reference's statistics, cached as an ADM reference batch
    with np.load(cached) as c:
        stats = {k: c[k] for k in c.files}
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    assert stats["mu_s"].shape == (2023,) and stats["sigma_s"].shape == (2023, 2023)
    np.testing.assert_allclose(stats["sigma"], np.cov(stats["pool_features"].astype(np.float64), rowvar=False),
                               rtol=1e-5, atol=1e-12)  # float32 features kept beside float64 statistics
    # a hand-made ADM batch: statistics only (mu, sigma, mu_s, sigma_s), no images
    np.savez(tmp_path / "stats_only.npz", **{k: stats[k] for k in adm.STAT_KEYS})
    assert cli.run(main, DEFAULTS, "doc", argv=[*common, f"reference={tmp_path / 'stats_only.npz'}"]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert stored["reference"]["statistics"] == "stored"
    assert stored["fid"] == pytest.approx(arrays["fid"], rel=1e-9)
    assert stored["sfid"] == pytest.approx(arrays["sfid"], rel=1e-9)
    assert stored["inception_score"] == arrays["inception_score"] and stored["precision"] is None


def test_reference_batches_read_as_adm_does(inception_file, tmp_path):
    """Stored statistics win over the images; images with stored statistics still give the
    precision/recall features; a file with neither is one clear error."""
    images = _images(6, 2)
    fake = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.ones(2023), "sigma_s": np.eye(2023)}
    np.savez(tmp_path / "both.npz", arr_0=images, **fake)

    class Counting:
        calls = 0

        def __call__(self, imgs, progress=False):
            Counting.calls += 1
            n = imgs.shape[0]
            return adm_features(torch.arange(n * 2048.0).reshape(n, 2048), torch.zeros(n, 1008),
                                torch.arange(n * 2023.0).reshape(n, 2023) % 7)

    from pf.eval.inception import Features as adm_features

    ref = adm.read_reference(tmp_path / "both.npz", Counting(), inception_file, tmp_path / "c")
    assert ref.source == "stored" and np.array_equal(ref.pool.mu, fake["mu"]) and ref.pool_features.shape == (6, 2048)
    again = adm.read_reference(tmp_path / "both.npz", Counting(), inception_file, tmp_path / "c")
    assert Counting.calls == 1 and np.array_equal(again.pool_features, ref.pool_features)  # the cache
    no_features = adm.read_reference(tmp_path / "both.npz", None, inception_file, None, need_features=False)
    assert no_features.pool_features is None and Counting.calls == 1
    np.savez(tmp_path / "neither.npz", labels=np.zeros(3))
    with pytest.raises(ValueError, match="neither images .arr_0. nor statistics"):
        adm.read_reference(tmp_path / "neither.npz", None, inception_file, None)
    np.savez(tmp_path / "half.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="not all of"):
        adm.read_reference(tmp_path / "half.npz", None, inception_file, None)


def test_guidance_sweep_table_and_plot(inception_file, tmp_path, capsys):
    from model_helpers import tiny_global_model
    from pf.eval.__main__ import DEFAULTS, main
    from pf.models.checkpoint import model_checkpoint, save_checkpoint

    save_checkpoint(model_checkpoint(tiny_global_model(dtype=torch.float32)), tmp_path / "sit.ckpt")
    np.savez(tmp_path / "ref.npz", arr_0=_images(10, 1))
    argv = [f"generated={tmp_path / 'sit.ckpt'}", f"reference={tmp_path / 'ref.npz'}", "extractor=inception",
            f"feature_extractor_weights_path={inception_file}", "stats_cache=null", "device=cpu", "metrics=[fid]",
            "num_samples=10", "batch_size=10", "sampler.name=heun", "sampler.steps=2", "sweep.cfg=[1.0,3.0]",
            "sweep.guidance_interval=[null,[0.5,1.0]]", f"sweep.out={tmp_path / 'sweep'}"]
    assert cli.run(main, DEFAULTS, "doc", argv=argv) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)["sweep"]
    assert [(r["cfg"], r["guidance_interval"]) for r in rows] == [(1.0, None), (1.0, [0.5, 1.0]), (3.0, None),
                                                                   (3.0, [0.5, 1.0])]
    fid = [r["fid"] for r in rows]
    assert fid[0] == fid[1]  # cfg 1: the interval changes nothing
    assert len({fid[0], fid[2], fid[3]}) == 3  # guidance, and where it applies, change the samples
    assert [r["nfe"] for r in rows] == [4, 4, 4, 4]
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| 3 | [0.5, 1] |" in table and "FID" in table and "| cfg |" in err
    from PIL import Image

    assert Image.open(tmp_path / "sweep" / "sweep.png").size[0] > 100
    assert cli.run(main, DEFAULTS, "doc", argv=[*argv[:-3], "sweep.cfg=[]"]) == 2
    assert "sweep.cfg needs at least one" in capsys.readouterr().err
    assert cli.run(main, DEFAULTS, "doc", argv=argv) == 2  # never over an earlier sweep
    assert "already holds a sweep" in capsys.readouterr().err


@pytest.mark.gpu
def test_inception_features_on_the_gpu_match_the_cpu(inception_file):
    from pf.eval.inception import InceptionFeatures

    x = torch.from_numpy(_images(4, 3)).permute(0, 3, 1, 2).contiguous()
    cpu, gpu = InceptionFeatures(inception_file)(x), InceptionFeatures(inception_file, device="cuda")(x)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
