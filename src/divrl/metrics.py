"""Evaluation statistics: the unbiased pass@k estimator and its standard error over prompts."""

from __future__ import annotations

import math
from collections.abc import Sequence


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
