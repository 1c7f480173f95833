"""divrl.weights: hand-computed weights, their product, config-time checks, missing statistics."""

import math

import pytest
import torch

from divrl import weights as W
from divrl.weights import Interval, TokenStats

F64 = torch.float64


def stats(entropy=(0.1, 2.0, 0.5, 1.2, 0.05, 0.9, 0.3)):
    """Seven tokens of four completions: A = (1.5, −0.5, 0, −2), p̂ = (0.5, 0.25, 0, 1)."""
    return TokenStats(
        rows=torch.tensor([0, 0, 1, 1, 1, 2, 3]),
        advantages=torch.tensor([1.5, -0.5, 0.0, -2.0], dtype=F64),
        rewards=torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64),
        group_pass_rate=torch.tensor([0.5, 0.25, 0.0, 1.0], dtype=F64),
        entropy=None if entropy is None else torch.tensor(entropy, dtype=F64),
    )


def assert_weights(actual, *expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0.0)


def test_names():
    assert W.names() == [
        "accuracy_tanh",
        "asymmetric",
        "confidence_shift",
        "dads",
        "diversity_allocation",
        "entropy_quantile",
        "failed",
        "group_unsolved",
        "low_probability_negatives",
        "pass_rate",
        "reference_entropy_above",
        "reference_entropy_at_most",
        "reference_kl_quantile",
        "resrl",
        "stcr",
        "success_adaptive",
    ]


# ---------------------------------------------------------------------------------------------
# Hand-computed outputs.


def test_entropy_quantile_keeps_the_top_fraction_of_the_batch():
    # Sorted entropies: 2.0, 1.2, 0.9, 0.5, 0.3, 0.1, 0.05 (tokens 1, 3, 5, 2, 6, 0, 4).
    s = stats()
    assert_weights(W.compute([("entropy_quantile", {})], s), 0, 1, 0, 1, 0, 0, 0)  # ⌈0.2·7⌉ = 2
    assert_weights(W.compute([("entropy_quantile", {"top": 0.5})], s), 0, 1, 1, 1, 0, 1, 0)  # ⌈3.5⌉ = 4
    assert_weights(W.compute([("entropy_quantile", {"top": 0.01})], s), 0, 1, 0, 0, 0, 0, 0)  # ⌈0.07⌉ = 1
    assert_weights(W.compute([("entropy_quantile", {"top": 1.0})], s), 1, 1, 1, 1, 1, 1, 1)


def test_entropy_quantile_counts_and_ties():
    def ten_tokens(*entropy):
        one = torch.zeros(1, dtype=F64)
        return TokenStats(torch.zeros(10, dtype=torch.long), one, one, one, entropy=torch.tensor(entropy, dtype=F64))

    # 0.3·10 = 3.0000000000000004 in floating point: still three tokens.
    assert_weights(W.entropy_quantile(ten_tokens(*range(10)), top=0.3), *[0.0] * 7, 1, 1, 1)
    # ⌈0.1·10⌉ = 1 token, but both tokens tied at τ are kept.
    assert_weights(W.entropy_quantile(ten_tokens(1, 3, 3, 2, *[0] * 6), top=0.1), 0, 1, 1, *[0.0] * 7)


def test_asymmetric_by_hand():
    w = W.compute([("asymmetric", {"positive": 0.1, "negative": 2.0})], stats())
    assert_weights(w, 0.1, 0.1, 2.0, 2.0, 2.0, 1.0, 2.0)


def test_pass_rate_by_hand():
    s = stats()
    # p̂ per token: 0.5, 0.5, 0.25, 0.25, 0.25, 0, 1.
    assert_weights(W.compute([("pass_rate", {})], s), 0.25, 0.25, 0.1875, 0.1875, 0.1875, 0.0, 0.0)
    q = 0.25**2 * 0.75
    assert_weights(W.compute([("pass_rate", {"a": 2, "b": 1})], s), 0.125, 0.125, q, q, q, 0.0, 0.0)
    # 0⁰ = 1: with a = 0 the all-wrong group keeps weight 1, with b = 0 the all-correct one.
    assert_weights(W.compute([("pass_rate", {"a": 0.0, "b": 2.0})], s), 0.25, 0.25, 0.5625, 0.5625, 0.5625, 1, 0)
    assert_weights(W.compute([("pass_rate", {"a": 0.0, "b": 0.0})], s), *[1.0] * 7)


def test_pass_rate_kernel_shape():
    """methods notes PACED: w(0) = w(1) = 0, w(0.5) = 0.25, argmax at a/(a + b)."""
    grid = torch.linspace(0, 1, 1001, dtype=F64)
    s = TokenStats(torch.arange(1001), grid, grid, grid)
    assert_weights(W.pass_rate(s)[[0, 500, 1000]], 0.0, 0.25, 0.0)
    assert grid[W.pass_rate(s, a=2.0, b=3.0).argmax()].item() == pytest.approx(0.4)


def test_compute_is_the_product_of_the_specs():
    s = stats()
    specs = [("asymmetric", {"positive": 0.1, "negative": 2.0}), ("pass_rate", {})]
    assert_weights(W.compute(specs, s), 0.025, 0.025, 0.375, 0.375, 0.375, 0.0, 0.0)
    specs = [("entropy_quantile", {"top": 0.5}), ("asymmetric", {"negative": 3})]
    assert_weights(W.compute(specs, s), 0, 1, 3, 3, 0, 1, 0)


def test_compute_of_no_specs_is_one():
    w = W.compute([], stats())
    assert w.shape == (7,) and w.dtype == F64
    assert_weights(w, *[1.0] * 7)


# ---------------------------------------------------------------------------------------------
# Validation without tensors, and missing statistics.


def test_check_accepts_valid_params():
    W.check("pass_rate", {})
    W.check("pass_rate", {"a": 2, "b": 0.5})  # an int is a valid float
    W.check("entropy_quantile", {"top": 1.0})
    W.check("asymmetric", {"positive": 0.1, "negative": 0})


def test_check_unknown_name_suggests_and_lists():
    with pytest.raises(ValueError, match="did you mean 'pass_rate'") as error:
        W.check("pass_rat", {})
    assert (
        "accuracy_tanh, asymmetric, confidence_shift, dads, diversity_allocation, entropy_quantile, failed, group_unsolved, low_probability_negatives, pass_rate, reference_entropy_above, reference_entropy_at_most, reference_kl_quantile, resrl, stcr, success_adaptive"
        in str(error.value)
    )
    with pytest.raises(ValueError, match="unknown weight 'zzz'; valid: accuracy_tanh, asymmetric"):
        W.check("zzz", {})
    with pytest.raises(ValueError, match="unknown weight 1; valid: accuracy_tanh, asymmetric"):
        W.check(1, {})  # a YAML key that is not a string


def test_check_unknown_parameter():
    with pytest.raises(ValueError, match=r"no parameter 'tp' \(did you mean 'top'\?\); parameters: top"):
        W.check("entropy_quantile", {"tp": 0.2})
    with pytest.raises(ValueError, match=r"no parameter 'c'.*parameters: a, b"):
        W.check("pass_rate", {"c": 1.0})


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("entropy_quantile", {"top": 0.0}, r"top must lie in \(0, 1\]"),
        ("entropy_quantile", {"top": 1.5}, r"top must lie in \(0, 1\]"),
        ("asymmetric", {"negative": -1.0}, r"negative must lie in \[0, ∞\)"),
        ("pass_rate", {"a": math.nan}, "a must lie in"),
        ("pass_rate", {"b": math.inf}, "b must lie in"),
        ("pass_rate", {"a": "1"}, "a must be of type float, got '1'"),
        ("pass_rate", {"a": True}, "a must be of type float, got True"),
    ],
)
def test_check_rejects_bad_types_and_ranges(name, params, message):
    with pytest.raises(ValueError, match=message):
        W.check(name, params)


def test_compute_checks_its_specs():
    with pytest.raises(ValueError, match="top must lie in"):
        W.compute([("entropy_quantile", {"top": 2.0})], stats())


def test_missing_statistic_is_named():
    with pytest.raises(ValueError, match="'entropy_quantile' needs the statistic 'entropy'"):
        W.compute([("entropy_quantile", {})], stats(entropy=None))


def test_a_new_weight_is_one_registered_function(monkeypatch):
    monkeypatch.setattr(W, "_WEIGHTS", dict(W._WEIGHTS))

    @W.register_weight("every_kth")
    def every_kth(stats: TokenStats, k: int, scale: float = 1.0) -> torch.Tensor:
        return scale * (torch.arange(len(stats.rows)) % k == 0).double()

    assert "every_kth" in W.names()
    assert_weights(W.compute([("every_kth", {"k": 3}), ("pass_rate", {"a": 0})], stats()), 0.5, 0, 0, 0.75, 0, 0, 0)
    with pytest.raises(ValueError, match=r"k must be of type int, got 1\.5"):
        W.check("every_kth", {"k": 1.5})
    W.check("every_kth", {"k": 2, "scale": -4.0})  # no Interval declared: any float
    with pytest.raises(ValueError, match="needs the parameters k"):
        W.check("every_kth", {"scale": 1.0})
    with pytest.raises(ValueError, match="already registered"):
        W.register_weight("every_kth")(every_kth)


def test_interval_text():
    assert str(Interval(0.0, 1.0, open_low=True)) == "(0, 1]"
    assert str(Interval(0.0)) == "[0, ∞)"


def test_low_probability_negatives_keeps_the_rarest_kept_negative_tokens():
    # 6 tokens of 3 completions; A = (+1, −1, −1); completions 1 and 2 are negative (tokens 2..5)
    stats = W.TokenStats(
        rows=torch.tensor([0, 0, 1, 1, 2, 2]),
        advantages=torch.tensor([1.0, -1.0, -1.0]),
        rewards=torch.zeros(3),
        group_pass_rate=torch.zeros(3),
        logprobs=torch.tensor([-9.0, -0.1, -5.0, -0.2, -4.0, -6.0]),
        target_logprobs=torch.tensor([-1.0, 0.0, -4.0, 0.0, -3.0, -math.inf]),
    )
    # negatives' log-probs: −5, −0.2, −4, −6; the lowest half (2 of 4): −6 and −5; −6 is filtered
    # out by the target (log q = −inf), so only token 2 remains; token 0 is rare but positive
    torch.testing.assert_close(
        W.compute([("low_probability_negatives", {"fraction": 0.5})], stats),
        torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
    )
    with pytest.raises(ValueError, match="needs the statistic 'target_logprobs'"):
        W.compute(
            [("low_probability_negatives", {})],
            W.TokenStats(
                rows=stats.rows,
                advantages=stats.advantages,
                rewards=stats.rewards,
                group_pass_rate=stats.group_pass_rate,
                logprobs=stats.logprobs,
            ),
        )


def test_accuracy_tanh_scales_from_half_to_its_maximum():
    base = dict(
        rows=torch.tensor([0, 0, 1]), advantages=torch.zeros(2), rewards=torch.zeros(2), group_pass_rate=torch.zeros(2)
    )
    for rate, expected in ((0.0, 0.5), (1.0, (1 + math.tanh(1.0)) / 2), (0.5, (1 + math.tanh(0.5)) / 2)):
        got = W.compute([("accuracy_tanh", {})], W.TokenStats(**base, batch_pass_rate=rate))
        torch.testing.assert_close(got, torch.full((3,), expected))
    with pytest.raises(ValueError, match="needs the statistic 'batch_pass_rate'"):
        W.compute([("accuracy_tanh", {})], W.TokenStats(**base))


def test_dads_loosens_the_kl_on_correct_answers_of_hard_prompts():
    # 4 completions, one token each; groups: (0, 1) with p̂ = 0.5, (2, 3) with p̂ = 1
    stats = W.TokenStats(
        rows=torch.arange(4),
        advantages=torch.tensor([1.0, -1.0, 0.5, 0.0]),
        rewards=torch.zeros(4),
        group_pass_rate=torch.tensor([0.5, 0.5, 1.0, 1.0]),
    )
    expected = torch.tensor([1 - math.exp(-math.e * 0.5), 1.0, 1.0, 1.0])
    torch.testing.assert_close(W.compute([("dads", {})], stats), expected)
    low = W.TokenStats(
        rows=torch.arange(1), advantages=torch.ones(1), rewards=torch.zeros(1), group_pass_rate=torch.tensor([0.125])
    )
    assert W.compute([("dads", {})], low).item() == pytest.approx(1 - math.exp(-math.e / 8))  # ≈ 0.288


def test_stcr_scales_long_failures_against_the_mean_passing_length():
    # group 0: completions of lengths 2 (pass), 4 (pass), 1 (fail), 5 (fail) → ℓ̄⁺ = 3;
    # group 1: lengths 2, 3, both fail → no pass, weights 1
    lengths = [2, 4, 1, 5, 2, 3]
    rows = torch.repeat_interleave(torch.arange(6), torch.tensor(lengths))
    stats = W.TokenStats(
        rows=rows,
        advantages=torch.zeros(6),
        rewards=torch.zeros(6),
        group_pass_rate=torch.zeros(6),
        passed=torch.tensor([True, True, False, False, False, False]),
        groups=torch.tensor([0, 0, 0, 0, 1, 1]),
    )
    per_completion = torch.tensor([1.0, 1.0, 1.0, 2 - 1.00001**-2, 1.0, 1.0])
    torch.testing.assert_close(W.compute([("stcr", {})], stats), per_completion[rows])


@pytest.mark.parametrize("name", W.names())
def test_a_weight_runs_without_the_online_batch_statistics_unless_it_declares_them(name):
    """What a batch of stored responses has (no groups, batch pass rate, diversity, reference or
    target log-probs): exactly the weights outside READ_BATCH, READ_REFERENCE, READ_TARGET run on it."""
    stored = TokenStats(
        rows=torch.tensor([0, 0, 1, 1, 1, 2, 3]),
        advantages=torch.zeros(4, dtype=F64),
        rewards=torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64),
        group_pass_rate=torch.tensor([0.5, 0.25, 0.0, 1.0], dtype=F64),
        entropy=torch.linspace(0.1, 2.0, 7, dtype=F64),
        logprobs=torch.linspace(-3.0, -0.1, 7, dtype=F64),
        old_logprobs=torch.linspace(-3.0, -0.1, 7, dtype=F64),
        passed=torch.tensor([True, False, False, False]),
        hidden=torch.randn(7, 8, dtype=F64, generator=torch.Generator().manual_seed(0)),
    )
    if name in W.READ_BATCH | W.READ_REFERENCE | W.READ_TARGET:
        with pytest.raises(ValueError, match="needs the statistic"):
            W.compute([(name, {})], stored)
    else:
        assert W.compute([(name, {})], stored).shape == (7,)
