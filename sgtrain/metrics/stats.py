"""Sample-quality statistics on feature arrays: FID, KID, Inception Score and improved precision/recall.

Pure functions: features (or classifier outputs) in, numbers out; no extractor, no files, no distributed code.
Inputs may be numpy arrays or torch tensors of any float dtype; everything is computed in float64 (the covariance
of 2048-d features and its square root lose digits in float32). Shapes: ``N``/``M`` samples, ``D`` feature
dimensions, ``C`` classes.

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to the two feature sets.
- KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel, averaged over random subsets; the
  same estimator as stylegan2-ada ``metrics/kernel_inception_distance.py`` and torchmetrics.
- IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` on contiguous splits.
- Precision/recall (Kynkäänniemi et al. 2019): k-NN manifolds of the real and fake sets.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _features(x: ArrayLike, name: str, min_rows: int = 2) -> np.ndarray:
    x = _float64(x)
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name} must have shape [N, D] with N >= {min_rows}, got {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------------------------------
# Fréchet distance (FID).


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (``numpy.cov(rowvar=False)``) of ``features [N, D]``, float64."""
    x = _features(features, "features")
    mu = x.mean(axis=0)
    centred = x - mu
    # Centre before the product: the "sum of x x^T minus N mu mu^T" form cancels catastrophically for features with
    # a large mean (Inception pool features are all positive).
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    # A covariance is positive semi-definite; rounding leaves eigenvalues like -1e-13 whose square root would be NaN.
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Fréchet distance between ``N(mu1 [D], sigma1 [D, D])`` and ``N(mu2, sigma2)``.

    ``||mu1 - mu2||² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})``.
    """
    mu1, mu2 = _float64(mu1), _float64(mu2)
    s1, s2 = _float64(sigma1), _float64(sigma2)
    if mu1.shape != mu2.shape or mu1.ndim != 1 or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    # tr((s1 s2)^{1/2}) is the sum of square roots of the eigenvalues of s1 s2, and s1 s2 = r (r s2) has the same
    # eigenvalues as (r s2) r = r s2 r with r = s1^{1/2}: a symmetric PSD matrix, so one eigh and one eigvalsh (real,
    # non-negative up to rounding) replace scipy.linalg.sqrtm of a non-symmetric matrix. For 2048-d features that is
    # ~3 s instead of ~40 s with the same value, and sqrtm's `disp` argument, which pytorch-fid relies on, is gone in
    # SciPy 1.18.
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    m = (m + m.T) / 2  # exact symmetry for eigvalsh; the product is symmetric only up to rounding
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# --------------------------------------------------------------------------------------------------------------------
# Kernel Inception Distance (KID).


def polynomial_mmd(
    x: ArrayLike, y: ArrayLike, *, degree: int = 3, gamma: float | None = None, coef: float = 1.0
) -> float:
    """Unbiased MMD² between ``x [m, D]`` and ``y [m, D]`` (equal sizes) with ``k(a, b) = (gamma a·b + coef)^degree``.

    ``gamma`` defaults to ``1 / D``. The within-set sums leave out the diagonal ``k(x_i, x_i)`` (Bińkowski et al.
    2018, Eq. 2): that is what makes the estimate unbiased, and why it can be negative for two samples of one
    distribution.
    """
    x, y = _features(x, "x"), _features(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    m, d = x.shape
    gamma = 1.0 / d if gamma is None else gamma
    k_xx = (gamma * (x @ x.T) + coef) ** degree
    k_yy = (gamma * (y @ y.T) + coef) ** degree
    k_xy = (gamma * (x @ y.T) + coef) ** degree
    within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    return float(within / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid_subsets(n_real: int, n_fake: int, *, subsets: int, subset_size: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    """The ``(real_idx [m], fake_idx [m])`` pairs that :func:`kernel_inception_distance` uses, ``m = min(...)``."""
    m = min(subset_size, n_real, n_fake)
    if m < 2 or subsets < 1:
        raise ValueError(f"need subsets >= 1 and a subset size >= 2, got {subsets} subsets of {m}")
    rng = np.random.default_rng(seed)
    return [(rng.choice(n_real, m, replace=False), rng.choice(n_fake, m, replace=False)) for _ in range(subsets)]


def kernel_inception_distance(
    real: ArrayLike,
    fake: ArrayLike,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID of ``real [N, D]`` and ``fake [M, D]``: mean and std (ddof=0, as torchmetrics) of the per-subset MMD².

    Each of ``subsets`` draws ``min(subset_size, N, M)`` rows of each set without replacement from
    ``numpy.random.default_rng(seed)`` (:func:`kid_subsets`), so the result is a pure function of its arguments.
    """
    x, y = _features(real, "real"), _features(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} and {y.shape[1]}")
    scores = np.array(
        [
            polynomial_mmd(x[i], y[j], degree=degree, gamma=gamma, coef=coef)
            for i, j in kid_subsets(len(x), len(y), subsets=subsets, subset_size=subset_size, seed=seed)
        ]
    )
    return float(scores.mean()), float(scores.std())


# --------------------------------------------------------------------------------------------------------------------
# Inception Score (IS).


def inception_score(logits_or_probs: ArrayLike, *, splits: int = 10, from_logits: bool = True) -> tuple[float, float]:
    """Inception Score of class predictions ``[N, C]``: mean and std (ddof=0) over ``splits`` contiguous chunks.

    Per chunk, ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the chunk's mean prediction (Salimans et al. 2016;
    the chunking of their and stylegan2-ada's code: rows ``[k N // splits, (k + 1) N // splits)``). The score lies in
    ``[1, C]``; chunks are not shuffled, so pass samples in generation order, not sorted by class.
    """
    z = _features(logits_or_probs, "logits_or_probs", min_rows=1)
    n = z.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N={n}], got {splits}")
    if from_logits:
        # log-softmax directly: softmax then log underflows to -inf for confident logits.
        log_p = z - z.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
    else:
        if (z < 0).any() or not np.allclose(z.sum(axis=1), 1.0, atol=1e-6):
            raise ValueError("probabilities must be non-negative and sum to 1 over classes (or pass from_logits=True)")
        p = z
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    scores = []
    for k in range(splits):
        part, log_part = p[k * n // splits : (k + 1) * n // splits], log_p[k * n // splits : (k + 1) * n // splits]
        py = part.mean(axis=0)
        # 0 log 0 = 0: a class with p(y|x) = 0 adds nothing to the KL, and p(y) = 0 only where every p(y|x) = 0, so
        # the logs of zeros are replaced before they can make 0 * -inf = NaN.
        log_py = np.log(py, out=np.zeros_like(py), where=py > 0)
        kl = (part * (np.where(part > 0, log_part, 0.0) - log_py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    scores = np.array(scores)
    return float(scores.mean()), float(scores.std())


# --------------------------------------------------------------------------------------------------------------------
# Improved precision and recall.


def _row_blocks(n: int, batch: int) -> list[slice]:
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


def _knn_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    # k + 1: each point's nearest neighbour in its own set is itself, at distance 0.
    return torch.cat([torch.cdist(x[rows], x).kthvalue(k + 1, dim=1).values for rows in _row_blocks(len(x), batch)])


@torch.no_grad()
def precision_recall(
    real: ArrayLike,
    fake: ArrayLike,
    *,
    k: int = 3,
    batch: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake [M, D]`` against ``real [N, D]``.

    A set's manifold is the union of balls around its points, each with the radius of that point's distance to its
    ``k``-th nearest neighbour in the set (itself excluded). Precision: fraction of fake samples inside the real
    manifold; recall: fraction of real samples inside the fake manifold (boundaries count as inside).

    Distances are float64 ``torch.cdist`` on ``device``, ``batch`` rows at a time, so at most ``batch x max(N, M)``
    distances exist at once (10k x 10k float64 would be 800 MB).
    """
    x, y = _features(real, "real"), _features(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} and {y.shape[1]}")
    if not 1 <= k < min(len(x), len(y)):
        raise ValueError(f"k must be in [1, min(N, M) - 1], got {k} for N={len(x)}, M={len(y)}")
    # float64 keeps the matmul form of cdist (|a|² + |b|² - 2ab, which torch uses above 25 rows) accurate enough that
    # ties and duplicate points are decided the same way in the radii and the membership tests.
    x = torch.from_numpy(x).to(device)
    y = torch.from_numpy(y).to(device)
    radii_real, radii_fake = _knn_radii(x, k, batch), _knn_radii(y, k, batch)
    fake_inside = torch.zeros(len(y), dtype=torch.bool, device=device)
    real_inside = torch.zeros(len(x), dtype=torch.bool, device=device)
    # One pass over the fake-to-real distances answers both questions.
    for rows in _row_blocks(len(y), batch):
        d = torch.cdist(y[rows], x)  # [b, N]
        fake_inside[rows] = (d <= radii_real[None, :]).any(dim=1)
        real_inside |= (d <= radii_fake[rows, None]).any(dim=0)
    return float(fake_inside.double().mean()), float(real_inside.double().mean())
