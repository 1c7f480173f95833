"""Fuzzing (issue 11): random shapes, −inf, huge and NaN log-probs, empty batches and one-token
completions through divrl.divergences, divrl.targets, divrl.weights and the objective.

The contract checked: a correct result — finite, or +inf exactly where a divergence is infinite
(disjoint supports, or a value beyond the dtype's range) — or a clear ValueError; never a NaN the
inputs did not hold, and no NaN gradient where the value is finite. Divergences are compared with
an mpmath reference evaluated on the very same (rounded) log-probabilities.
"""

import math

import mpmath
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from divrl import divergences as D
from divrl import objectives
from divrl import targets as T
from divrl import weights as W
from divrl.chunked import Head
from divrl.rowwise import ModelOutputs
from divrl.spec import parse_objective

INF = math.inf
F32, F64 = torch.float32, torch.float64
FUZZ = settings(max_examples=60, deadline=None, derandomize=True)

# Every pointwise divergence and parameter, including the endpoints and both sides of α = ½.
CASES = [("reverse_kl", {}), ("forward_kl", {}), ("total_variation", {}), ("chi2", {}), ("hellinger", {})]
CASES += [("jsd", {"beta": b}) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
CASES += [("alpha", {"alpha": a}) for a in (-1.0, 0.0, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)]

LOGITS = st.one_of(st.floats(-8, 8), st.sampled_from([-INF, -1e4, 1e4, -1e30, 1e30]))


@st.composite
def logprob_rows(draw, dtype, batch=None, vocab=None):
    """Normalized log-probs (*batch, V) in ``dtype`` from logits mixing moderate, ±1e4, ±1e30 and
    −inf entries; every row keeps at least one finite logit (so every row has mass)."""
    batch = draw(st.sampled_from([(), (0,), (1,), (3,), (2, 2)])) if batch is None else batch
    vocab = draw(st.integers(1, 5)) if vocab is None else vocab
    count = math.prod(batch) * vocab
    logits = torch.tensor(draw(st.lists(LOGITS, min_size=count, max_size=count)), dtype=F64)
    logits = logits.reshape(*batch, vocab)
    keep = torch.tensor(
        draw(st.lists(st.integers(0, vocab - 1), min_size=math.prod(batch), max_size=math.prod(batch)))
    ).reshape(*batch, 1)
    logits = logits.scatter(-1, keep, torch.tensor(draw(st.floats(-8, 8)), dtype=F64).expand(*batch, 1))
    return logits.to(dtype).log_softmax(-1)


@st.composite
def logprob_pairs(draw, dtype=None):
    """(p, q) of one shape and dtype: independent, equal, or q = p with some entries zeroed."""
    dtype = draw(st.sampled_from([F32, F64])) if dtype is None else dtype
    p = draw(logprob_rows(dtype))
    relation = draw(st.sampled_from(["independent", "independent", "equal", "subset"]))
    if relation == "equal":
        return p, p.clone()
    if relation == "subset":
        zero = torch.tensor(draw(st.lists(st.booleans(), min_size=p.numel(), max_size=p.numel()))).reshape(p.shape)
        return p, p.masked_fill(zero & (p < p.amax(-1, keepdim=True)), -INF).log_softmax(-1) if p.numel() else p
    return p, draw(logprob_rows(dtype, batch=tuple(p.shape[:-1]), vocab=p.shape[-1]))


# --- the mpmath reference ------------------------------------------------------------------------

mpmath.mp.dps = 60


def _reference_term(name, params, lp, lq):
    """D's term at one vocabulary entry from its log-probabilities, exactly (mpmath)."""
    p = mpmath.mpf(0) if lp == -INF else mpmath.exp(mpmath.mpf(lp))
    q = mpmath.mpf(0) if lq == -INF else mpmath.exp(mpmath.mpf(lq))

    def kl(a, b, la, lb):  # a log(a/b)
        return mpmath.mpf(0) if a == 0 else (mpmath.inf if b == 0 else a * (mpmath.mpf(la) - mpmath.mpf(lb)))

    if name == "reverse_kl":
        return kl(p, q, lp, lq)
    if name == "forward_kl":
        return kl(q, p, lq, lp)
    if name == "jsd":
        b = mpmath.mpf(params["beta"])
        if b == 0:
            return kl(q, p, lq, lp)
        if b == 1:
            return kl(p, q, lp, lq)
        m = b * q + (1 - b) * p
        return b * kl(q, m, lq, mpmath.log(m)) + (1 - b) * kl(p, m, lp, mpmath.log(m)) if m else mpmath.mpf(0)
    if name == "total_variation":
        return abs(p - q) / 2
    if name == "chi2":
        return (mpmath.inf if p else mpmath.mpf(0)) if q == 0 else (p - q) ** 2 / q
    if name == "hellinger":
        return (mpmath.sqrt(p) - mpmath.sqrt(q)) ** 2
    a = mpmath.mpf(params["alpha"])
    if a == 1:
        return kl(p, q, lp, lq)
    if a == 0:
        return kl(q, p, lq, lp)
    if p == 0 and q == 0:
        return mpmath.mpf(0)
    if q == 0:  # p·f'(∞)
        return mpmath.inf if a > 1 else p / (1 - a)
    if p == 0:  # q·f(0)
        return mpmath.inf if a < 0 else q / a
    # q f(p/q) with p^α q^{1−α} in log space
    mixed = mpmath.exp(a * mpmath.mpf(lp) + (1 - a) * mpmath.mpf(lq))
    return (mixed - a * p - (1 - a) * q) / (a * (a - 1))


def reference(name, params, policy, target):
    """(D per row, Σ|terms| + Σ(p + q) per row: the scale of the rounding error) in float64."""
    lp, lq = policy.double().reshape(-1, policy.shape[-1]), target.double().reshape(-1, target.shape[-1])
    values, scales = [], []
    for row_p, row_q in zip(lp.tolist(), lq.tolist()):
        terms = [_reference_term(name, params, a, b) for a, b in zip(row_p, row_q)]
        values.append(float(mpmath.fsum(terms)))
        scales.append(float(mpmath.fsum(abs(t) for t in terms)) + sum(math.exp(x) for x in row_p + row_q))
    shape = policy.shape[:-1]
    return torch.tensor(values, dtype=F64).reshape(shape), torch.tensor(scales, dtype=F64).reshape(shape)


def assert_matches_reference(value, name, params, policy, target):
    expected, scale = reference(name, params, policy, target)
    finfo = torch.finfo(value.dtype)
    assert not value.isnan().any(), (name, params, value)
    rounded = torch.where(expected.abs() > finfo.max, expected.sign() * INF, expected)
    infinite = rounded.isinf()
    assert torch.equal(value.isinf(), infinite), (name, params, value, expected)
    assert torch.equal(value[infinite].double(), rounded[infinite]), (name, params, value, expected)
    error = (value.double() - expected).abs()[~infinite]
    tolerance = (64 * finfo.eps * (1 + scale) + 64 * finfo.eps * expected.abs())[~infinite]
    assert (error <= tolerance).all(), (name, params, value, expected, error.max())


# --- divergences -----------------------------------------------------------------------------------

# Regressions the fuzzing found (each gave NaN): q underflowing to 0 below p > 0 at a finite
# log-ratio, where χ², α ∉ [½, 1] and f_divergence took 0·∞; an empty batch for Sinkhorn.
HALVES, ONE_HOT = torch.zeros(2, dtype=F64).log_softmax(-1), torch.tensor([0.0, -1e4], dtype=F64).log_softmax(-1)
Q_UNDERFLOWS, P_UNDERFLOWS = (HALVES, ONE_HOT), (ONE_HOT, HALVES)  # float64; .float() for float32


@FUZZ
@given(logprob_pairs())
@example(Q_UNDERFLOWS)
@example(P_UNDERFLOWS)
@example((HALVES.float(), ONE_HOT.float()))
def test_every_divergence_matches_the_exact_value_on_extreme_inputs(pair):
    policy, target = pair
    for name, params in CASES:
        value = D.get(name)(policy, target, **params)
        assert value.shape == policy.shape[:-1] and value.dtype == policy.dtype
        assert_matches_reference(value, name, params, policy, target)


@FUZZ
@given(logprob_pairs(dtype=F64))
@example(Q_UNDERFLOWS)
@example(P_UNDERFLOWS)
def test_gradients_are_never_nan_where_the_value_is_finite_nor_where_infinite_terms_are_masked(pair):
    for name, params in CASES:
        policy, target = (t.clone().requires_grad_() for t in pair)
        term = D.pointwise(name, **params)(policy, target)
        finite_terms = torch.where(term.isfinite(), term, 0.0).sum()
        for grad in torch.autograd.grad(finite_terms, (policy, target), allow_unused=True):
            assert grad is None or not grad.isnan().any(), (name, params)
        value = D.get(name)(policy, target, **params)
        if value.isfinite().all() and value.numel():
            for grad in torch.autograd.grad(value.sum(), (policy, target)):
                assert not grad.isnan().any(), (name, params)


@FUZZ
@given(logprob_pairs())
@example((HALVES.float(), ONE_HOT.float()))
def test_f_divergence_is_never_nan_and_agrees_with_its_closed_form_where_finite(pair):
    policy, target = pair
    generators = {  # (f, f'(∞), the closed form it generates)
        "reverse_kl": (lambda t: torch.xlogy(t, t), INF),
        "total_variation": (lambda t: 0.5 * (t - 1).abs(), 0.5),
        "hellinger": (lambda t: (t.sqrt() - 1) ** 2, 1.0),
    }
    for name, (f, f_prime_inf) in generators.items():
        value = D.f_divergence(policy, target, f=f, f_prime_inf=f_prime_inf)
        assert not value.isnan().any(), name
        closed = D.get(name)(policy, target)
        if name != "reverse_kl":  # bounded: the f-form must be as exact as the closed form
            torch.testing.assert_close(value, closed, rtol=1e-4, atol=1e-5)


@FUZZ
@given(logprob_pairs(), st.sampled_from(["k1", "k2", "k3", "k1_st", "k3_st"]))
@example((ONE_HOT.float(), HALVES.float()), "k3")  # eʳ overflowed: the masked +inf had a NaN gradient
def test_sampled_estimators_on_extreme_log_ratios(pair, name):
    """At a token y: log p(y), log q(y) anywhere in [−inf, 0]: finite, or +inf where log q(y) = −inf < log p(y)
    (k2 also where p(y) = 0 < q(y)), and the value of k1 = −r, k2 = ½r², k3 = eʳ − 1 − r."""
    policy, target = (t.flatten() for t in pair)
    policy = policy.clone().requires_grad_()
    value = D.get_estimator(name)(policy, target)
    assert not value.isnan().any(), name
    r = target.double() - policy.detach().double()
    r = torch.where(policy.detach().isinf() & target.isinf(), 0.0, r)
    expected = {"k1": -r, "k2": 0.5 * r**2, "k3": torch.expm1(r) - r}[name[:2]]
    finite = expected.abs() <= torch.finfo(policy.dtype).max
    assert torch.equal(value.isinf(), ~finite | expected.isinf()), (name, value, expected)
    torch.testing.assert_close(value[finite].double(), expected[finite], rtol=1e-5, atol=1e-6)
    masked = torch.where(value.isfinite(), value, 0.0).sum()
    if masked.requires_grad:
        (grad,) = torch.autograd.grad(masked, policy)
        assert not grad.isnan().any(), name


@FUZZ
@given(logprob_pairs(), st.data())
def test_a_nan_row_gives_nan_in_that_row_only(pair, data):
    """NaN inputs are not checked here (the objective raises on them) but never spread nor vanish:
    a NaN logit makes its row of log-probs NaN, and that row's value is NaN (a NaN log p was once
    read as the p = 0 of 0·log 0, making forward_kl silently finite)."""
    policy, target = (t.reshape(-1, t.shape[-1]) for t in pair)
    if not len(policy):
        return
    row = data.draw(st.integers(0, len(policy) - 1))
    policy = policy.clone()
    policy[row] = math.nan
    others = torch.arange(len(policy)) != row
    for name, params in CASES:
        value = D.get(name)(policy, target, **params)
        assert value[row].isnan() and not value[others].isnan().any(), (name, params)
    for name, target_fn in TARGETS.items():
        q = target_fn(policy, target)
        assert not q[others].isnan().any(), name


def test_rows_without_mass_follow_the_sums_and_never_give_nan():
    """An all-(−inf) row (a target with no mass, e.g. extrapolate on disjoint supports): each
    divergence is its sum over the vocabulary, so KL(p‖∅) = +inf and KL(∅‖p) = 0."""
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=F64).log()
    empty = torch.full((2, 2), -INF, dtype=F64)
    assert torch.equal(D.reverse_kl(p, empty), torch.tensor([INF, INF], dtype=F64))
    assert torch.equal(D.forward_kl(p, empty), torch.zeros(2, dtype=F64))
    for name, params in CASES:
        assert not D.get(name)(p, empty, **params).isnan().any(), (name, params)
        assert not D.get(name)(empty, p, **params).isnan().any(), (name, params)


def line_cost(vocab):
    positions = torch.arange(vocab, dtype=F64)
    return (positions[:, None] - positions[None, :]).abs()


@settings(max_examples=30, deadline=None, derandomize=True)
@given(logprob_pairs(dtype=F64))
@example((torch.zeros(0, 1, dtype=F64), torch.zeros(0, 1, dtype=F64)))  # an empty batch raised in max()
def test_sinkhorn_is_finite_with_finite_gradients_on_extreme_inputs(pair):
    vocab = pair[0].shape[-1]
    for divergence in (
        lambda p, q: D.sinkhorn(p, q, line_cost(vocab), epsilon=0.1, iterations=50),
        lambda p, q: D.sinkhorn_topk(p, q, line_cost(vocab), k=2, epsilon=0.1, iterations=50),
    ):
        policy = pair[0].clone().requires_grad_()
        value = divergence(policy, pair[1])
        assert value.shape == policy.shape[:-1] and value.isfinite().all() and (value >= -1e-9).all()
        if value.numel():
            (grad,) = torch.autograd.grad(value.sum(), policy)
            assert grad.isfinite().all()


def test_sinkhorn_of_a_row_without_mass_is_inf():
    """No coupling of p with an empty measure: the infimum over an empty set, +inf."""
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=F64).log()
    empty = p.clone()
    empty[1] = -INF
    value = D.sinkhorn(p, empty, line_cost(2), iterations=20)
    assert value[0].isfinite() and value[1] == INF
    assert torch.equal(D.sinkhorn_topk(p, empty, line_cost(2), k=1, iterations=20).isinf(), torch.tensor([False, True]))


# --- targets ---------------------------------------------------------------------------------------


TARGETS = {
    "tilt": lambda a, b: T.tilt(a, torch.where(b.isfinite(), b, 0.0), 0.3),
    "tilt_huge_advantage": lambda a, b: T.tilt(a, torch.where(b.isfinite(), b, 0.0) * 1e4, 1e-3),
    "extrapolate_half": lambda a, b: T.extrapolate(a, b, 0.5),
    "extrapolate_three": lambda a, b: T.extrapolate(a, b, 3.0),
    "mix": lambda a, b: T.mix(a, b, 0.3),
    "filter": lambda a, b: T.filter(a, 0.1),
    "filter_relative": lambda a, b: T.filter(a, 0.5, relative=True),
    "temperature": lambda a, b: T.temperature(a, 0.05),
    "reward_power": lambda a, b: T.reward_power(a, 0.3, floor=0.2),
    "uniform": lambda a, b: T.uniform(a),
    "tilt_of_extrapolate": lambda a, b: T.tilt(T.extrapolate(a, b, 2.0), 1.0, 0.5),
    "filter_of_extrapolate": lambda a, b: T.filter(T.extrapolate(a, b, 2.0), 0.2),
    "temperature_of_extrapolate": lambda a, b: T.temperature(T.extrapolate(a, b, 2.0), 2.0),
    "uniform_of_extrapolate": lambda a, b: T.uniform(T.extrapolate(a, b, 2.0)),
    "mix_of_extrapolates": lambda a, b: T.mix(T.extrapolate(a, b, 2.0), T.extrapolate(b, a, 0.5), 0.5),
}


@FUZZ
@given(logprob_pairs(), st.sampled_from(sorted(TARGETS)))
def test_every_target_is_normalized_or_has_no_mass_and_never_nan(pair, name):
    a, b = pair
    q = TARGETS[name](a, b)
    assert q.shape == a.shape and q.dtype == a.dtype
    assert not q.isnan().any() and (q <= 0).all(), name
    if q.numel():
        mass = q.double().logsumexp(-1)
        empty = mass == -INF  # a row without mass stays all −inf (extrapolate of disjoint supports)
        torch.testing.assert_close(mass[~empty], torch.zeros_like(mass[~empty]), atol=1e-5, rtol=0)


@FUZZ
@given(logprob_pairs(dtype=F64), st.sampled_from(sorted(TARGETS)))
def test_target_gradients_are_never_nan(pair, name):
    a, b = (t.clone().requires_grad_() for t in pair)
    q = TARGETS[name](a, b)
    loss = (q.exp() * torch.arange(q.shape[-1], dtype=F64)).sum() + torch.where(q.isfinite(), q, 0.0).sum()
    for grad in torch.autograd.grad(loss, (a, b), allow_unused=True):
        assert grad is None or not grad.isnan().any(), name


def test_targets_of_a_row_without_mass_keep_it_without_mass():
    empty = torch.full((1, 3), -INF, dtype=F64)
    for name, target in TARGETS.items():
        q = target(empty, empty)
        assert torch.equal(q, empty), name


# --- weights ---------------------------------------------------------------------------------------


@st.composite
def token_stats(draw):
    """TokenStats of B completions in groups (sizes 1–3, all-pass, all-fail or mixed), 0–3 tokens
    each (so empty completions and an empty batch occur), zero and tied entropies."""
    group_sizes = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    groups = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes, dtype=torch.long))
    b = len(groups)
    passed = torch.tensor(draw(st.lists(st.booleans(), min_size=b, max_size=b)), dtype=torch.bool)
    lengths = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=b, max_size=b)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(b), lengths)
    n = len(rows)
    rate = torch.zeros(len(group_sizes), dtype=F64).index_add_(0, groups, passed.double())
    rate = (rate / torch.tensor(group_sizes, dtype=F64).clamp(min=1))[groups] if b else torch.zeros(0, dtype=F64)
    floats = st.sampled_from([0.0, 0.0, 1.0, -1.0, 1e4, -1e4, 0.5])
    vector = lambda size: torch.tensor(draw(st.lists(floats, min_size=size, max_size=size)), dtype=F64)  # noqa: E731
    logprobs = -vector(n).abs()
    return W.TokenStats(
        rows=rows,
        advantages=vector(b),
        rewards=passed.double(),
        group_pass_rate=rate,
        entropy=vector(n).abs(),
        logprobs=logprobs,
        old_logprobs=logprobs,
        ref_logprobs=-vector(n).abs(),
        target_logprobs=-vector(n).abs(),
        batch_pass_rate=float(passed.double().mean()) if b else 0.0,
        passed=passed,
        groups=groups,
        reference_entropy=vector(n).abs(),
        reference_kl=vector(n).abs(),
        diversity=vector(b).clamp(0, 1),
        hidden=torch.stack([vector(3) for _ in range(n)]) if n else torch.zeros(0, 3, dtype=F64),
    )


@FUZZ
@given(token_stats())
def test_every_weight_is_finite_and_nonnegative_on_edge_case_groups(stats):
    for name in W.names():
        weight = W.compute([(name, {})], stats)
        assert weight.shape == stats.rows.shape, name
        assert weight.isfinite().all() and (weight >= 0).all(), (name, weight)


# --- the objective ---------------------------------------------------------------------------------

OBJECTIVES = {
    "grpo_with_reverse_kl": {"terms": [{"divergence": "reverse_kl", "target": "reference", "coef": 0.1}]},
    "k3_in_the_loss": {"terms": [{"divergence": "reverse_kl", "target": "reference", "estimator": "k3", "coef": 0.1}]},
    "jsd_to_a_mixture_masked": {
        "pg_mask": {"entropy_quantile": {"top": 0.5}},
        "terms": [
            {
                "divergence": "jsd",
                "params": {"beta": 0.5},
                "target": {"mix": {"a": "reference", "b": "self", "alpha": 0.5}},
                "coef": 0.1,
                "weight": {"pass_rate": {}},
            }
        ],
    },
    "distillation_only": {
        "policy_gradient": False,
        "terms": [{"divergence": "forward_kl", "target": "reference", "coef": 1.0}],
    },
}


def objective_inputs(lengths, vocab, bias=None, seed=0):
    """ObjectiveInputs of completions of the given lengths (0 allowed) in one group, float64."""
    gen = torch.Generator().manual_seed(seed)
    n, h, b = sum(lengths), 3, len(lengths)
    hidden = torch.randn(n, h, generator=gen, dtype=F64).requires_grad_()
    head = Head(torch.randn(vocab, h, generator=gen, dtype=F64), bias)
    ref = ModelOutputs(
        torch.randn(n, h, generator=gen, dtype=F64), Head(torch.randn(vocab, h, generator=gen, dtype=F64))
    )
    rewards = torch.tensor([float(i % 2) for i in range(b)], dtype=F64)
    return objectives.ObjectiveInputs(
        policy=ModelOutputs(hidden, head),
        tokens=torch.randint(0, vocab, (n,), generator=gen),
        rows=torch.repeat_interleave(torch.arange(b), torch.tensor(lengths, dtype=torch.long)),
        advantages=rewards - rewards.mean() if b else rewards,
        rewards=rewards,
        group_pass_rate=torch.full((b,), float(rewards.mean()) if b else 0.0, dtype=F64),
        token_scale=torch.full((n,), 1.0 / max(n, 1), dtype=F64),
        models={"reference": ref},
    )


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 2), min_size=0, max_size=3), st.integers(1, 4), st.sampled_from(sorted(OBJECTIVES)))
@example([], 3, "grpo_with_reverse_kl")  # an empty batch
@example([1], 1, "jsd_to_a_mixture_masked")  # one single-token completion, a vocabulary of one
def test_objective_on_empty_batches_and_single_token_completions(lengths, vocab, name):
    spec = parse_objective(OBJECTIVES[name])
    inputs = objective_inputs(lengths, vocab)
    out = objectives.objective_loss(spec, inputs)
    assert out.loss.isfinite(), (name, out.loss_parts)
    assert all(math.isfinite(v) for v in out.loss_parts.values()), out.loss_parts
    assert all(math.isfinite(v) for v in out.token_sums.values()), out.token_sums
    (grad,) = torch.autograd.grad(out.loss, inputs.policy.hidden, allow_unused=True)
    assert grad is None or grad.isfinite().all()
    if not sum(lengths):
        assert out.loss == 0


@pytest.mark.parametrize("objective", ["grpo_with_reverse_kl", "k3_in_the_loss", "jsd_to_a_mixture_masked"])
def test_objective_raises_a_clear_error_on_nan_policy_outputs(objective):
    inputs = objective_inputs([2, 1], 4)
    with torch.no_grad():
        inputs.policy.hidden[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"NaN in .*at tokens \[1\]"):
        objectives.objective_loss(parse_objective(OBJECTIVES[objective]), inputs)


@pytest.mark.parametrize("objective", ["grpo_with_reverse_kl", "k3_in_the_loss", "jsd_to_a_mixture_masked"])
def test_objective_raises_a_clear_error_on_nan_reference_outputs(objective):
    """The fused path (grpo_with_reverse_kl) once gave 0 here: the divergence terms read a NaN
    log-ratio as the 0·log 0 of a zero mass."""
    inputs = objective_inputs([2, 1], 4)
    inputs.models["reference"].hidden[2, 1] = math.nan
    with pytest.raises(ValueError, match="NaN in"):
        objectives.objective_loss(parse_objective(OBJECTIVES[objective]), inputs)
