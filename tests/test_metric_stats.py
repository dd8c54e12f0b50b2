"""Metric statistics on feature arrays: FID, KID, IS and precision/recall (exact where possible, CPU, fast)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from sgtrain.metrics.stats import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    kid_subsets,
    polynomial_mmd,
    precision_recall,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def random_spd(d: int, seed: int) -> np.ndarray:
    a = rng(seed).standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def sqrtm_fid(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid / TTUR reference formula, with scipy.linalg.sqrtm of the non-symmetric product."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SciPy deprecation chatter about sqrtm's arguments is not under test
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


# --------------------------------------------------------------------------------------------------------------------
# FID.


def test_feature_statistics_match_numpy():
    x = rng().standard_normal((50, 7)) * 3 + 100  # a large mean, as Inception pool features have
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    mu_t, sigma_t = feature_statistics(torch.from_numpy(x).float())  # torch float32 in, float64 out
    assert mu_t.dtype == sigma_t.dtype == np.float64
    np.testing.assert_allclose(sigma_t, sigma, rtol=0, atol=1e-5 * np.abs(sigma).max())


def test_fid_of_a_set_against_itself_is_zero():
    x = rng().standard_normal((500, 64)) @ rng(1).standard_normal((64, 64))
    mu, sigma = feature_statistics(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_rank_deficient_covariance_against_itself_is_zero():
    # Fewer samples than dimensions, as with 2048-d features and few samples: sigma is singular. Its null-space
    # eigenvalues come out as rounding noise ~1e-16 |sigma| whose square roots (~1e-8 each) do not cancel exactly,
    # so the bound is relative to the scale of the traces.
    mu, sigma = feature_statistics(rng().standard_normal((20, 64)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_fid_closed_form_for_diagonal_gaussians():
    r = rng(3)
    a, b = r.uniform(0.1, 4, 16), r.uniform(0.1, 4, 16)
    mu1, mu2 = r.standard_normal(16), r.standard_normal(16)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("d", [2, 16, 100])
def test_fid_matches_sqrtm_on_random_spd(d):
    s1, s2 = random_spd(d, 10 + d), random_spd(d, 20 + d)
    mu1, mu2 = rng(d).standard_normal(d), rng(d + 1).standard_normal(d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(sqrtm_fid(mu1, s1, mu2, s2), rel=1e-6)


def test_fid_is_symmetric_and_grows_with_distance():
    base = rng().standard_normal((400, 8))
    stats = feature_statistics(base)
    near = feature_statistics(rng(1).standard_normal((400, 8)) + 0.5)
    far = feature_statistics(rng(2).standard_normal((400, 8)) * 2 + 3)
    assert frechet_distance(*stats, *near) == pytest.approx(frechet_distance(*near, *stats), rel=1e-10)
    assert 0 < frechet_distance(*stats, *near) < frechet_distance(*stats, *far)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --------------------------------------------------------------------------------------------------------------------
# KID.


def brute_force_mmd(x, y, degree=3, gamma=None, coef=1.0) -> float:
    m, d = x.shape
    gamma = 1 / d if gamma is None else gamma

    def k(a, b):
        return (gamma * a @ b + coef) ** degree

    pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / (m * (m - 1))
    return within - 2 * sum(k(x[i], y[j]) for i, j in itertools.product(range(m), repeat=2)) / m**2


@pytest.mark.parametrize(("degree", "gamma", "coef"), [(3, None, 1.0), (2, 0.5, 0.0), (1, 1.0, 0.0)])
def test_polynomial_mmd_matches_definition(degree, gamma, coef):
    x, y = rng().standard_normal((9, 4)), rng(1).standard_normal((9, 4)) + 0.3
    got = polynomial_mmd(x, y, degree=degree, gamma=gamma, coef=coef)
    assert got == pytest.approx(brute_force_mmd(x, y, degree, gamma, coef), rel=1e-12)


def test_linear_mmd_is_unbiased_estimate_of_mean_difference():
    # With k(a, b) = a·b, MMD² = ||mu_x - mu_y||²; averaged over many draws the unbiased estimate converges to it
    # (the biased V-statistic would be off by (tr Σx + tr Σy) / m = 2 * 4 / 5 here).
    mu = np.array([1.0, 0.0, -1.0, 0.5])
    r = rng(7)
    est = [
        polynomial_mmd(r.standard_normal((5, 4)) + mu, r.standard_normal((5, 4)), degree=1, gamma=1.0, coef=0.0)
        for _ in range(20000)
    ]
    assert np.mean(est) == pytest.approx(mu @ mu, abs=0.05)


def test_kid_near_zero_for_one_distribution_positive_for_two():
    a, b = rng(1).standard_normal((600, 32)), rng(2).standard_normal((600, 32))
    c = rng(3).standard_normal((600, 32)) * 1.5 + 0.5
    same_mean, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=200)
    diff_mean, _ = kernel_inception_distance(a, c, subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std / np.sqrt(20) + 1e-9  # zero within its standard error
    per_subset = [polynomial_mmd(a[i], b[j]) for i, j in kid_subsets(600, 600, subsets=20, subset_size=200, seed=0)]
    assert min(per_subset) < 0 < max(per_subset)  # unbiased: single estimates of a zero MMD fall on both sides
    assert diff_mean > 100 * abs(same_mean)


def test_kid_is_a_deterministic_function_of_the_seed():
    a, b = rng(1).standard_normal((300, 8)), rng(2).standard_normal((250, 8)) + 0.2
    assert kernel_inception_distance(a, b, subsets=5, subset_size=100, seed=4) == kernel_inception_distance(
        a, b, subsets=5, subset_size=100, seed=4
    )
    assert kernel_inception_distance(a, b, subsets=5, subset_size=100, seed=4) != kernel_inception_distance(
        a, b, subsets=5, subset_size=100, seed=5
    )


def test_kid_subsets_are_capped_and_without_replacement():
    pairs = kid_subsets(30, 20, subsets=4, subset_size=1000, seed=0)
    assert len(pairs) == 4
    for i, j in pairs:
        assert len(i) == len(j) == 20 and len(set(i)) == len(set(j)) == 20
        assert i.max() < 30 and j.max() < 20


def test_kid_equals_mean_and_std_over_its_subsets():
    a, b = rng(1).standard_normal((80, 6)), rng(2).standard_normal((70, 6))
    scores = [polynomial_mmd(a[i], b[j]) for i, j in kid_subsets(80, 70, subsets=6, subset_size=50, seed=3)]
    mean, std = kernel_inception_distance(a, b, subsets=6, subset_size=50, seed=3)
    assert (mean, std) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Inception Score.


def test_is_uniform_predictions_score_one():
    assert inception_score(np.zeros((100, 10))) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert inception_score(np.full((100, 10), 0.1), from_logits=False) == pytest.approx((1.0, 0.0), abs=1e-12)


@pytest.mark.parametrize("c", [2, 10, 1000])
def test_is_confident_and_balanced_scores_number_of_classes(c):
    labels = np.tile(np.arange(c), 5)  # every contiguous split of 5 holds each class once
    probs = np.eye(c)[labels]
    assert inception_score(probs, splits=5, from_logits=False) == pytest.approx((c, 0.0), rel=1e-12, abs=1e-9)
    logits = 100.0 * probs  # softmax saturates; the log-softmax path stays finite
    assert inception_score(logits, splits=5) == pytest.approx((c, 0.0), rel=1e-12, abs=1e-9)


def test_is_splits_are_contiguous_chunks():
    c = 4
    sorted_by_class = np.eye(c)[np.repeat(np.arange(c), 25)]
    # One split sees all classes; four contiguous splits each see a single class (p(y) = p(y|x), KL = 0).
    assert inception_score(sorted_by_class, splits=1, from_logits=False) == pytest.approx((4.0, 0.0))
    assert inception_score(sorted_by_class, splits=4, from_logits=False) == pytest.approx((1.0, 0.0))
    # Two splits of two classes each.
    assert inception_score(sorted_by_class, splits=2, from_logits=False) == pytest.approx((2.0, 0.0))


def test_is_matches_reference_per_split():
    logits = rng().standard_normal((103, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ref = []
    for k in range(3):
        part = p[k * 103 // 3 : (k + 1) * 103 // 3]
        ref.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(axis=0))), axis=1))))
    assert inception_score(logits, splits=3) == pytest.approx((np.mean(ref), np.std(ref)), rel=1e-12)
    assert inception_score(torch.from_numpy(p), splits=3, from_logits=False) == pytest.approx(
        (np.mean(ref), np.std(ref)), rel=1e-12
    )


def test_is_rejects_bad_input():
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((3, 2)), splits=4)
    with pytest.raises(ValueError, match="probabilities"):
        inception_score(np.ones((3, 2)), splits=1, from_logits=False)


# --------------------------------------------------------------------------------------------------------------------
# Precision and recall.


def clusters(centres: np.ndarray, per: int, seed: int) -> np.ndarray:
    r = rng(seed)
    return np.concatenate([c + r.standard_normal((per, centres.shape[1])) for c in centres])


# Four modes in 2-D, far apart relative to their unit spread. Low dimension keeps the k-NN manifold of a finite sample
# close to its mode's support (in 8-D, a fresh sample of the same distribution already reaches only ~0.86 precision).
CENTRES = 50.0 * np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


def test_pr_hand_computed_1d():
    # k = 1. Real radii: 1 for each of 0,1,2,3. Fake radii: 3.4 (0.5 to 3.9), 6.1 (10 to 3.9), 3.4.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0], [3.9]])
    # 0.5 and 3.9 (0.9 from 3) lie in the real manifold, 10 does not; every real point is within 3.4 of 0.5 or 3.9.
    for batch in (1, 2, 1024):
        assert precision_recall(real, fake, k=1, batch=batch) == pytest.approx((2 / 3, 1.0), abs=1e-15)


def test_pr_identical_sets():
    x = clusters(CENTRES, 50, seed=0)
    assert precision_recall(x, x.copy(), k=3, batch=37) == (1.0, 1.0)


def test_pr_disjoint_far_apart_sets():
    real = clusters(CENTRES[:2], 50, seed=0)
    fake = clusters(CENTRES[2:], 50, seed=1)
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_pr_half_the_modes():
    real = clusters(CENTRES, 250, seed=0)
    fake = clusters(CENTRES[:2], 500, seed=1)  # as many samples, all in two of the four modes
    precision, recall = precision_recall(real, fake, k=3, batch=128)
    assert precision > 0.95
    assert 0.45 < recall <= 0.5  # the two uncovered modes' real samples are all outside
    full_precision, full_recall = precision_recall(real, clusters(CENTRES, 250, seed=1), k=3, batch=128)
    assert full_precision > 0.95 and full_recall > 0.95


def test_pr_does_not_depend_on_batch_or_input_type():
    real, fake = rng(1).standard_normal((120, 5)), rng(2).standard_normal((90, 5)) + 0.3
    ref = precision_recall(real, fake, k=5, batch=1000)
    assert precision_recall(torch.from_numpy(real).float().double(), torch.from_numpy(fake), k=5, batch=7) == ref


def test_pr_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.zeros((4, 2)), np.ones((3, 2)), k=3)


# --------------------------------------------------------------------------------------------------------------------
# Agreement with torchmetrics on the same features (its Inception path needs torch-fidelity, which is not used).


class IdentityFeatures(torch.nn.Module):
    """A torchmetrics feature extractor that returns its "images", which are already feature vectors."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_kid(kid_mod, d: int, subsets: int, subset_size: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features in buffer"
        return kid_mod.KernelInceptionDistance(feature=IdentityFeatures(d), subsets=subsets, subset_size=subset_size)


def test_fid_matches_torchmetrics():
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    d = 32
    real = torch.from_numpy(rng(1).standard_normal((500, d)) @ rng(2).standard_normal((d, d)) + 3)
    fake = torch.from_numpy(rng(3).standard_normal((400, d)) * 1.3 + 2.5)
    metric = fid_mod.FrechetInceptionDistance(feature=IdentityFeatures(d))
    for chunk in real.split(128):
        metric.update(chunk, real=True)
    for chunk in fake.split(128):
        metric.update(chunk, real=False)
    expected = float(metric.compute())
    got = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    assert got == pytest.approx(expected, rel=1e-3)
    assert got == pytest.approx(expected, rel=1e-8)  # float64 on both sides: far closer than the acceptance 1e-3


def test_kid_polynomial_mmd_matches_torchmetrics_on_identical_subsets():
    kid_mod = pytest.importorskip("torchmetrics.image.kid")
    real, fake = rng(1).standard_normal((300, 16)), rng(2).standard_normal((260, 16)) * 1.2 + 0.1
    for i, j in kid_subsets(300, 260, subsets=5, subset_size=100, seed=0):
        expected = float(kid_mod.poly_mmd(torch.from_numpy(real[i]), torch.from_numpy(fake[j])))
        assert polynomial_mmd(real[i], fake[j]) == pytest.approx(expected, rel=1e-10)


def test_kid_matches_torchmetrics_metric_on_its_own_subsets():
    kid_mod = pytest.importorskip("torchmetrics.image.kid")
    d, subsets, size = 16, 10, 100
    real = torch.from_numpy(rng(1).standard_normal((300, d)))
    fake = torch.from_numpy(rng(2).standard_normal((260, d)) * 1.2 + 0.1)
    metric = make_kid(kid_mod, d, subsets, size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(123)
    expected_mean, expected_std = (float(v) for v in metric.compute())
    # Replay torchmetrics' draws (randperm of real, then of fake, per subset) and average our per-subset MMD².
    torch.manual_seed(123)
    scores = []
    for _ in range(subsets):
        i, j = torch.randperm(300)[:size].numpy(), torch.randperm(260)[:size].numpy()
        scores.append(polynomial_mmd(real[i], fake[j]))
    assert np.mean(scores) == pytest.approx(expected_mean, rel=1e-3)
    assert np.std(scores) == pytest.approx(expected_std, rel=1e-3)
    # With one subset of every sample the draw does not matter: kernel_inception_distance itself agrees.
    metric = make_kid(kid_mod, d, 1, 260)
    metric.update(real[:260], real=True)
    metric.update(fake, real=False)
    got_mean, _ = kernel_inception_distance(real[:260], fake, subsets=1, subset_size=260)
    assert got_mean == pytest.approx(float(metric.compute()[0]), rel=1e-3)
