import math
from itertools import combinations

import pytest

from divrl.metrics import mean_and_stderr, pass_at_k, pass_at_k_over_prompts


def brute_force_pass_at_k(n, c, k):
    """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_1_is_fraction_correct_and_large_n_is_exact():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # C(10000, 500) overflows floats; the product form does not.
    n, c, k = 10_000, 37, 500
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Python ints: exact rational
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(n, 0, k) == 0.0 and pass_at_k(n, n - k + 1, k) == 1.0


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(TypeError):
        pass_at_k(4.0, 1, 1)


def test_stderr_and_prompt_average():
    mean, se = mean_and_stderr([0.0, 1.0, 0.0, 1.0])
    assert mean == 0.5 and se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    mean, _ = pass_at_k_over_prompts([0, 4, 2], n=4, k=1)
    assert mean == pytest.approx((0 + 1 + 0.5) / 3)
