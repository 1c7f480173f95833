"""Evaluation statistics: the unbiased pass@k estimator, its standard error and bootstrap interval
over prompts, majority voting at k, distinct-n, and best-of-N with its KL to the sampler."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Codex").

    pass@k = 1 − C(n−c, k) / C(n, k), computed as the product Π_{i=n−c+1}^{n} (1 − k/i), which never
    forms a binomial coefficient, so it is exact and overflow-free for any n.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k takes integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n ≥ 1, 0 ≤ c ≤ n and 1 ≤ k ≤ n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    log_fail = sum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return 1.0 - math.exp(log_fail)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / √m) of per-prompt values."""
    m = len(values)
    if m == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    mean = sum(values) / m
    if m == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (m - 1)
    return mean, math.sqrt(var / m)


def pass_at_k_over_prompts(correct_counts: Sequence[int], n: int, k: int) -> tuple[float, float]:
    """pass@k averaged over prompts (each with n samples, c_i correct) and its standard error."""
    return mean_and_stderr([pass_at_k(n, c, k) for c in correct_counts])


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-prompt values, prompts resampled with
    replacement (Efron & Tibshirani 1993, ch. 13)."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rows = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    low, high = np.quantile(data[rows].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def majority_at_k(answers: Sequence[str], correct: Sequence[float], k: int, draws: int = 256, seed: int = 0) -> float:
    """maj@k of one prompt: the expected correctness of the most frequent final answer among k of
    its n samples drawn without replacement (a tie counts the mean of the tied answers: a uniform
    tie-break in expectation), estimated from `draws` random k-subsets (exact for k = 1 and k = n). An answer's correctness is the
    mean verdict of the subset's samples that gave it (the verdict of a reasoning-gym sample is a
    function of its answer, so this is that verdict)."""
    n = len(answers)
    if not 1 <= k <= n or len(correct) != n:
        raise ValueError(f"majority_at_k needs 1 ≤ k ≤ n = {n} answers with as many verdicts; got k={k}")
    ids = {a: i for i, a in enumerate(dict.fromkeys(answers))}
    answer_id = np.array([ids[a] for a in answers])
    verdict = np.asarray(correct, dtype=np.float64)
    if k == 1:  # every single sample is its own majority
        return float(verdict.mean())
    rng = np.random.default_rng(seed)
    draws = 1 if k == n else draws
    subsets = np.argsort(rng.random((draws, n)), axis=1)[:, :k]  # (draws, k) sample indices
    one_hot = np.zeros((draws, k, len(ids)))
    np.put_along_axis(one_hot, answer_id[subsets][..., None], 1.0, axis=2)
    votes = one_hot.sum(1)  # (draws, A)
    hits = (one_hot * verdict[subsets][..., None]).sum(1)
    tied = votes == votes.max(axis=1, keepdims=True)  # the uniform tie-break, in expectation
    accuracy = np.divide(hits, votes, out=np.zeros_like(hits), where=votes > 0)
    return float(((tied * accuracy).sum(1) / tied.sum(1)).mean())


def distinct_n(sequences: Sequence[Sequence], n: int) -> float:
    """distinct-n (Li et al. 2016): distinct n-grams / all n-grams over the sequences (0 if none)."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def best_of_n(scores: Sequence[float], correct: Sequence[float], n: int) -> tuple[float, float]:
    """(accuracy, KL(π_BoN ‖ π)) of best-of-N selection from π = the empirical distribution of one
    prompt's samples (each of the m samples has mass 1/m), computed exactly instead of resampled.

    The best of N i.i.d. draws has score ≤ s with probability F(s)^N (F: the empirical CDF), so a
    tie group g of equal scores gets P_g = F(s_g)^N − F(s_g⁻)^N, spread evenly over its members.
    Accuracy = Σ_g P_g · mean verdict in g; KL = Σ_g P_g log(P_g / π(g)). Without ties and m → ∞
    the KL tends to log N − (N−1)/N (methods.md C5; Beirami et al. 2024), an upper bound with ties."""
    m = len(scores)
    if m == 0 or len(correct) != m or n < 1:
        raise ValueError("best_of_n needs scores and verdicts of equal, non-zero length and N ≥ 1")
    by_score = Counter(float(s) for s in scores)
    verdicts: dict[float, float] = {}
    for s, c in zip(scores, correct):
        verdicts[float(s)] = verdicts.get(float(s), 0.0) + float(c)
    accuracy = kl = 0.0
    below = 0
    for s in sorted(by_score):
        size = by_score[s]
        mass = ((below + size) / m) ** n - (below / m) ** n
        below += size
        if mass > 0:
            accuracy += mass * verdicts[s] / size
            kl += mass * math.log(mass / (size / m))
    return accuracy, kl


def bootstrap_difference_ci(
    a: Sequence[float], b: Sequence[float], paired: bool, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) − mean(b) over prompts: paired (the same prompts,
    resampled together: the interval of the mean per-prompt difference) or, for different prompt
    sets, each side resampled independently."""
    if paired:
        if len(a) != len(b):
            raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
        return bootstrap_ci(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), level, resamples, seed)
    rng = np.random.default_rng(seed)
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) == 0 or len(y) == 0:
        raise ValueError("bootstrap_difference_ci needs values on both sides")
    diffs = x[rng.integers(0, len(x), (resamples, len(x)))].mean(1) - y[
        rng.integers(0, len(y), (resamples, len(y)))
    ].mean(1)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
