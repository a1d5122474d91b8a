"""ADM's evaluation suite (Dhariwal & Nichol 2021, ``guided-diffusion/evaluations``): FID,
sFID, Inception Score and precision / recall of a sample batch against a reference batch.

Definitions, as ADM's evaluator computes them (written here from the formulas):

    FID / sFID   Frechet distance between Gaussians fitted to the pool (2048) / spatial (2023)
                 features: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, with
                 ``S = np.cov(features)`` (N - 1)
    IS           ``exp(mean_x KL(p(y|x) || p(y)))`` per split, averaged over 10 equal splits of
                 the samples in order (ADM: splits of 5000, i.e. 10 for 50K), p = softmax of the
                 unbiased 1008-way logits
    precision    share of sample features within the k-NN ball (k = 3; the radius is the
                 distance to the k-th nearest other reference feature) of some reference feature
    recall       the same with the roles swapped

A reference batch is an ``.npz``: ``mu``, ``sigma`` (pool) and ``mu_s``, ``sigma_s`` (spatial)
are used as stored when present (as ADM does); its images ``arr_0`` (uint8 NHWC) give the
reference features precision / recall need (and the statistics when not stored). Statistics
computed here are cached as such an ``.npz`` (plus ``pool_features``), keyed by the contents
of the reference file and of the weights file, so a reference is read through Inception once.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from pf.eval.inception import PORT, InceptionFeatures
from pf.eval.inputs import InputError, load_npz
from pf.models.checkpoint import write_atomically

IS_SPLITS = 10
PR_NEIGHBOURS = 3
CACHE_VERSION = "adm-v1"  # part of the cache key: bump when the features change
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


#################################################################################
#                                   Metrics                                     #
#################################################################################


class Gaussian(NamedTuple):
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    factor: np.ndarray | None = None  # (N, D) with sigma = factor.T @ factor, kept when N <= D


def fit_gaussian(features) -> Gaussian:
    """Mean and covariance (N - 1 normalised, as ``np.cov``) of (N, D) features, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance, got shape {f.shape}")
    factor = (f - f.mean(0)) / math.sqrt(f.shape[0] - 1)  # (N, D)
    return Gaussian(f.mean(0), np.cov(f, rowvar=False), factor if f.shape[0] <= f.shape[1] else None)


def _sum_sqrt_eigenvalues(m: np.ndarray) -> float:
    """Sum of the square roots of a symmetric PSD matrix's eigenvalues (round-off negatives as 0)."""
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``.

    ``tr((S_a S_b)^(1/2))`` is the sum of the square roots of the eigenvalues of the symmetric
    ``S_a^(1/2) S_b S_a^(1/2)`` (similar to ``S_a S_b``): real arithmetic throughout, no complex
    ``sqrtm``. When one side was fitted to N <= D vectors, ``S = F^T F`` and the same nonzero
    eigenvalues are those of the (N, N) ``F S_other F^T``: exact, and cheap for small sets.
    """
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics of different widths: {a.mu.shape} and {b.mu.shape}")
    low_rank = [g for g in (a, b) if g.factor is not None]
    if low_rank:
        small = min(low_rank, key=lambda g: g.factor.shape[0])
        other = b if small is a else a
        tr_covmean = _sum_sqrt_eigenvalues(small.factor @ other.sigma @ small.factor.T)
    else:
        w, v = np.linalg.eigh(a.sigma)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_a^(1/2)
        tr_covmean = _sum_sqrt_eigenvalues(root_a @ b.sigma @ root_a)
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def inception_score(logits, splits: int = IS_SPLITS) -> float:
    """Mean over ``splits`` equal consecutive splits of ``exp(mean KL(p(y|x) || p(y)))``:
    torch-fidelity's own formula, with its shuffle off (ADM splits the samples in order)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric  # optional (eval extra)

    logits = torch.as_tensor(logits, dtype=torch.float64)
    if logits.shape[0] < splits:
        raise ValueError(f"the Inception Score's {splits} splits need at least {splits} samples, got {logits.shape[0]}")
    return isc_features_to_metric(logits, splits=splits, shuffle=False)[KEY_METRIC_ISC_MEAN]


def _knn_radii(features: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Squared distance of each feature to its k-th nearest other feature: (N,)."""
    if features.shape[0] <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} feature vectors, got {features.shape[0]}")
    radii = []
    for s in range(0, features.shape[0], block):
        d = torch.cdist(features[s:s + block], features).pow(2)  # (b, N), the self-distance 0 included
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _share_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    inside = []
    for s in range(0, points.shape[0], block):
        d = torch.cdist(points[s:s + block], centres).pow(2)  # (b, N)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall(reference, samples, k: int = PR_NEIGHBOURS, block: int = 1000,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """(precision, recall) of sample features against reference features (k-NN manifolds)."""
    ref = torch.as_tensor(reference, dtype=torch.float64, device=device)
    gen = torch.as_tensor(samples, dtype=torch.float64, device=device)
    precision = _share_inside(gen, ref, _knn_radii(ref, k, block), block)
    recall = _share_inside(ref, gen, _knn_radii(gen, k, block), block)
    return precision, recall


#################################################################################
#                                Reference batches                              #
#################################################################################


class Reference(NamedTuple):
    pool: Gaussian
    spatial: Gaussian
    pool_features: np.ndarray | None  # (N, 2048), None when the file holds statistics only
    source: str  # "stored" | "computed" | "cache"


def _file_digest(path: Path, h=None) -> str:
    h = h or hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_path(reference: Path, weights: Path, cache_dir: Path) -> Path:
    """Where the statistics of ``reference`` under these Inception weights are cached."""
    h = hashlib.blake2b(digest_size=12)
    h.update(CACHE_VERSION.encode())
    h.update(_file_digest(weights).encode())
    return Path(cache_dir) / f"{reference.stem}-{_file_digest(reference, h)}.npz"


def statistics_of(features) -> dict:
    """The ADM reference-batch arrays of extracted :class:`~pf.eval.inception.Features`."""
    pool, spatial = fit_gaussian(features.pool.numpy()), fit_gaussian(features.spatial.numpy())
    return {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu, "sigma_s": spatial.sigma,
            "pool_features": features.pool.numpy().astype(np.float32)}


def write_statistics(path: str | Path, stats: dict) -> Path:
    """An ``.npz`` of ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (and ``pool_features``), written atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to the temp name
            np.savez(f, **stats)

    write_atomically(path, write)
    return Path(path)


def read_reference(path: str | Path, extract: InceptionFeatures | None, weights: str | Path | None,
                   cache_dir: str | Path | None, need_features: bool = True, progress: bool = False) -> Reference:
    """The statistics (and, when it has images, the pool features) of an ADM reference ``.npz``.

    Stored ``mu``/``sigma``/``mu_s``/``sigma_s`` are used as they are; the images ``arr_0``
    go through Inception once (the result is cached under ``cache_dir`` when given), when the
    statistics are not stored or ``need_features`` (precision / recall) asks for them.
    """
    path = Path(path)
    with np.load(path) as f:
        keys = set(f.files)
        stored = {k: f[k] for k in STAT_KEYS if k in keys}
        pool_features = f["pool_features"] if "pool_features" in keys else None
    has_stats = len(stored) == len(STAT_KEYS)
    if stored and not has_stats:
        raise InputError(f"{path}: holds {sorted(stored)} but not all of {list(STAT_KEYS)}")
    if "arr_0" not in keys and not has_stats:
        raise InputError(f"{path}: neither images (arr_0) nor statistics ({', '.join(STAT_KEYS)}); found {sorted(keys)}")
    if has_stats and (pool_features is not None or "arr_0" not in keys or not need_features):
        return Reference(Gaussian(stored["mu"], stored["sigma"]), Gaussian(stored["mu_s"], stored["sigma_s"]),
                         pool_features, "stored")
    # images to read through Inception: from the cache, or computed (and cached)
    cached = cache_path(path, Path(weights), Path(cache_dir)) if cache_dir is not None and weights else None
    if cached is not None and cached.is_file():
        with np.load(cached) as c:
            computed, source = {k: c[k] for k in (*STAT_KEYS, "pool_features")}, "cache"
    else:
        if extract is None:
            raise ValueError(f"{path}: its images need the Inception network (feature_extractor_weights_path)")
        computed, source = statistics_of(extract(load_npz(path), progress=progress)), "computed"
        if cached is not None:
            write_statistics(cached, computed)
    if has_stats:  # ADM: the stored statistics win; the images give precision/recall's features
        computed.update(stored)
        source = "stored"
    return Reference(Gaussian(computed["mu"], computed["sigma"]), Gaussian(computed["mu_s"], computed["sigma_s"]),
                     computed["pool_features"], source)


def reference_of_images(images: torch.Tensor, extract: InceptionFeatures, progress: bool = False) -> Reference:
    """A reference from images at hand (a folder, a data set)."""
    s = statistics_of(extract(images, progress=progress))
    return Reference(Gaussian(s["mu"], s["sigma"]), Gaussian(s["mu_s"], s["sigma_s"]), s["pool_features"], "computed")


#################################################################################
#                                   The suite                                   #
#################################################################################

METRICS = ("fid", "sfid", "is", "prc")


def evaluate_features(gen, ref: Reference, metrics=METRICS, device: str | torch.device = "cpu") -> dict:
    """ADM's numbers of sample features ``gen`` (:class:`Features`) against ``ref``."""
    out: dict = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(fit_gaussian(gen.pool.numpy()), ref.pool)
    if "sfid" in metrics:
        out["sfid"] = frechet_distance(fit_gaussian(gen.spatial.numpy()), ref.spatial)
    if "is" in metrics:
        out["inception_score"] = inception_score(gen.logits)
    if "prc" in metrics:
        if ref.pool_features is None:
            out["precision"] = out["recall"] = None
            out["note"] = "the reference holds statistics only (no arr_0 images): no precision/recall"
        else:
            out["precision"], out["recall"] = precision_recall(ref.pool_features, gen.pool, device=device)
    return out


__all__ = ["Gaussian", "METRICS", "PORT", "Reference", "cache_path", "evaluate_features", "fit_gaussian",
           "frechet_distance", "inception_score", "precision_recall", "read_reference", "reference_of_images",
           "statistics_of", "write_statistics"]
