"""Properties of divrl.divergences: conventions, f-forms, limits, −inf handling, gradients, estimators."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from divergence_cases import POINTWISE_CASES
from divrl import divergences as D

F64 = torch.float64
INF = math.inf

CASE_IDS = [f"{name}{params}" for name, params in POINTWISE_CASES]


def generator(name, params):
    """The f of D_f(p‖q) = Σ q f(p/q) for each closed form, and f'(∞) = lim f(t)/t (design notes §2)."""
    if name == "reverse_kl":
        return (lambda t: torch.xlogy(t, t)), INF
    if name == "forward_kl":
        return (lambda t: -torch.log(t)), 0.0
    if name == "jsd":
        b = params["beta"]
        if b == 0.0:
            return generator("forward_kl", {})
        if b == 1.0:
            return generator("reverse_kl", {})

        def f(t):  # with m/q = b + (1 − b)t: b·KL(q‖m) + (1 − b)·KL(p‖m) = Σ q f(p/q)
            mixture = b + (1 - b) * t
            return -b * torch.log(mixture) + (1 - b) * (torch.xlogy(t, t) - t * torch.log(mixture))

        return f, -(1 - b) * math.log(1 - b)
    if name == "total_variation":
        return (lambda t: 0.5 * (t - 1).abs()), 0.5
    if name == "chi2":
        return (lambda t: (t - 1) ** 2), INF
    if name == "hellinger":
        return (lambda t: (t.sqrt() - 1) ** 2), 1.0
    if name == "alpha":
        a = params["alpha"]
        if a == 0.0:
            return generator("forward_kl", {})
        if a == 1.0:
            return generator("reverse_kl", {})
        return (lambda t: (t**a - a * t - (1 - a)) / (a * (a - 1))), (1 / (1 - a) if a < 1 else INF)
    raise KeyError(name)


@st.composite
def distribution_pairs(draw, zeros=True):
    """Two float64 log-prob vectors on one vocabulary: independent, equal, or nearly tied."""
    size = draw(st.integers(2, 7))

    def logprobs():
        logits = torch.tensor(draw(st.lists(st.floats(-8, 8), min_size=size, max_size=size)), dtype=F64)
        if zeros:
            zero = torch.tensor(draw(st.lists(st.booleans(), min_size=size, max_size=size)))
            zero[draw(st.integers(0, size - 1))] = False
            logits = logits.masked_fill(zero, -INF)
        return logits.log_softmax(-1)

    policy = logprobs()
    relation = draw(st.sampled_from(["independent", "equal", "near"]))
    if relation == "independent":
        return policy, logprobs()
    if relation == "equal":
        return policy, policy.clone()
    scale = draw(st.sampled_from([1e-12, 1e-6, 1e-3]))
    noise = torch.tensor(draw(st.lists(st.floats(-1, 1), min_size=size, max_size=size)), dtype=F64)
    return policy, (policy + scale * noise).log_softmax(-1)


def random_logprobs(*shape, generator_seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(generator_seed)
    return (2 * torch.randn(*shape, generator=gen, dtype=dtype)).log_softmax(-1)


# --- registry and the pointwise contract ------------------------------------------------------


def test_get_and_get_estimator_reject_unknown_names_listing_valid_ones():
    with pytest.raises(ValueError, match="reverse_kl"):
        D.get("kl")
    with pytest.raises(ValueError, match=r"k1.*k3_st"):
        D.get_estimator("k4")


def test_pointwise_rejects_sinkhorn_unknown_names_and_unknown_params():
    with pytest.raises(ValueError, match="not a sum"):
        D.pointwise("sinkhorn")
    with pytest.raises(ValueError, match="forward_kl"):
        D.pointwise("nope")
    with pytest.raises(ValueError, match="bta"):
        D.pointwise("jsd", bta=0.5)
    with pytest.raises(ValueError, match="beta"):
        D.jsd(random_logprobs(3), random_logprobs(3, generator_seed=1), beta=1.5)


@pytest.mark.parametrize("name,params", POINTWISE_CASES, ids=CASE_IDS)
def test_divergence_is_the_vocabulary_sum_of_its_pointwise_term_on_any_leading_shape(name, params):
    policy, target = random_logprobs(2, 3, 11), random_logprobs(2, 3, 11, generator_seed=1)
    term = D.pointwise(name, **params)(policy, target)
    assert term.shape == policy.shape
    value = D.get(name)(policy, target, **params)
    assert value.shape == (2, 3)
    torch.testing.assert_close(value, term.sum(-1), rtol=0, atol=0)


@pytest.mark.parametrize("name,params", POINTWISE_CASES, ids=CASE_IDS)
def test_computes_in_the_given_dtype(name, params):
    policy, target = (
        random_logprobs(4, 9, dtype=torch.float32),
        random_logprobs(4, 9, generator_seed=1, dtype=torch.float32),
    )
    value = D.get(name)(policy, target, **params)
    assert value.dtype == torch.float32
    torch.testing.assert_close(
        value.double(), D.get(name)(policy.double(), target.double(), **params), rtol=1e-4, atol=1e-5
    )


# --- properties over random distributions with zeros and near-ties ----------------------------


@settings(max_examples=150, deadline=None)
@given(distribution_pairs())
def test_nonnegative_and_zero_iff_equal(pair):
    policy, target = pair
    separated = D.total_variation(policy, target) > 1e-3
    for name, params in POINTWISE_CASES:
        value = D.get(name)(policy, target, **params)
        assert not value.isnan(), name
        assert value >= -1e-12, (name, params, value)
        assert D.get(name)(policy, policy, **params).abs() <= 1e-12, (name, params)
        if separated:
            assert value > 0, (name, params, value)


@settings(max_examples=150, deadline=None)
@given(distribution_pairs())
def test_f_divergence_with_the_generator_equals_each_closed_form(pair):
    policy, target = pair
    for name, params in POINTWISE_CASES:
        f, f_prime_inf = generator(name, params)
        closed = D.get(name)(policy, target, **params)
        f_form = D.f_divergence(policy, target, f=f, f_prime_inf=f_prime_inf)
        torch.testing.assert_close(
            f_form, closed, rtol=1e-9, atol=1e-12, msg=lambda m, name=name, params=params: f"{name} {params}: {m}"
        )


@settings(max_examples=100, deadline=None)
@given(distribution_pairs())
def test_alpha_and_jsd_endpoints_are_the_two_kls_exactly(pair):
    policy, target = pair
    reverse, forward = D.reverse_kl(policy, target), D.forward_kl(policy, target)
    for value, expected in [
        (D.alpha(policy, target, alpha=1.0), reverse),
        (D.alpha(policy, target, alpha=0.0), forward),
        (D.jsd(policy, target, beta=1.0), reverse),
        (D.jsd(policy, target, beta=0.0), forward),
    ]:
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)


@settings(max_examples=100, deadline=None)
@given(distribution_pairs(zeros=False))
def test_alpha_tends_to_the_kls_as_alpha_tends_to_1_and_0(pair):
    policy, target = pair
    delta = 1e-7
    reverse, forward = D.reverse_kl(policy, target), D.forward_kl(policy, target)
    for a in (1 - delta, 1 + delta):
        torch.testing.assert_close(D.alpha(policy, target, alpha=a), reverse, rtol=1e-4, atol=1e-9)
    for a in (-delta, delta):
        torch.testing.assert_close(D.alpha(policy, target, alpha=a), forward, rtol=1e-4, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(distribution_pairs())
def test_symmetries(pair):
    policy, target = pair
    for name, params in [("total_variation", {}), ("hellinger", {}), ("jsd", {"beta": 0.5})]:
        torch.testing.assert_close(D.get(name)(policy, target, **params), D.get(name)(target, policy, **params))
    # Swapping p and q swaps the roles: jsd(β)(p, q) = jsd(1−β)(q, p), D_α(p‖q) = D_{1−α}(q‖p).
    for b in (0.0, 0.2, 0.7):
        torch.testing.assert_close(D.jsd(policy, target, beta=b), D.jsd(target, policy, beta=1 - b))
    for a in (-1.0, 0.3, 2.0):
        torch.testing.assert_close(D.alpha(policy, target, alpha=a), D.alpha(target, policy, alpha=1 - a))


@settings(max_examples=100, deadline=None)
@given(distribution_pairs())
def test_a_token_impossible_under_both_changes_nothing(pair):
    policy, target = pair
    padded_policy = torch.cat([policy, torch.tensor([-INF], dtype=F64)])
    padded_target = torch.cat([target, torch.tensor([-INF], dtype=F64)])
    for name, params in POINTWISE_CASES:
        torch.testing.assert_close(
            D.get(name)(padded_policy, padded_target, **params), D.get(name)(policy, target, **params)
        )


# --- zero probabilities: exact values, +inf, no NaN -------------------------------------------


def disjoint_pair():
    policy = torch.tensor([0.0, 1.0, -INF, -INF], dtype=F64).log_softmax(-1)
    target = torch.tensor([-INF, -INF, 2.0, 0.0], dtype=F64).log_softmax(-1)
    return policy, target


def test_disjoint_supports_give_inf_or_the_exact_finite_value():
    policy, target = disjoint_pair()
    assert D.reverse_kl(policy, target) == INF
    assert D.forward_kl(policy, target) == INF
    assert D.chi2(policy, target) == INF
    assert D.alpha(policy, target, alpha=2.0) == INF
    assert D.alpha(policy, target, alpha=-1.0) == INF
    torch.testing.assert_close(D.total_variation(policy, target), torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(D.hellinger(policy, target), torch.tensor(2.0, dtype=F64))
    # Disjoint p, q: each KL to the mixture is −log of the mixture weight of the other.
    for b in (0.5, 0.2):
        expected = -b * math.log(b) - (1 - b) * math.log(1 - b)
        torch.testing.assert_close(D.jsd(policy, target, beta=b), torch.tensor(expected, dtype=F64))
    # Amari 0 < α < 1: Σ_p p/(1−α) + Σ_q q/α.
    torch.testing.assert_close(D.alpha(policy, target, alpha=0.3), torch.tensor(1 / 0.7 + 1 / 0.3, dtype=F64))


def test_zero_in_policy_only_is_an_exact_zero_term():
    target = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64).log()
    policy = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64).log()
    expected = 0.5 * math.log(0.5 / 0.1) + 0.5 * math.log(0.5 / 0.2)
    torch.testing.assert_close(D.reverse_kl(policy, target), torch.tensor(expected, dtype=F64), rtol=1e-15, atol=0)
    assert D.forward_kl(policy, target) == INF


@settings(max_examples=150, deadline=None)
@given(distribution_pairs())
def test_gradients_are_finite_wherever_the_value_is(pair):
    for name, params in POINTWISE_CASES:
        policy, target = (t.clone().requires_grad_() for t in pair)
        value = D.get(name)(policy, target, **params)
        assert not value.isnan()
        if value.isfinite():
            policy_grad, target_grad = torch.autograd.grad(value, (policy, target))
            assert policy_grad.isfinite().all() and target_grad.isfinite().all(), (name, params)
        # A caller that masks the infinite terms out gets finite gradients from the rest.
        term = D.pointwise(name, **params)(policy, target)
        masked = torch.where(term.isfinite(), term, 0.0).sum()
        policy_grad, target_grad = torch.autograd.grad(masked, (policy, target))
        assert policy_grad.isfinite().all() and target_grad.isfinite().all(), (name, params)


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", POINTWISE_CASES, ids=CASE_IDS)
def test_gradcheck_float64(name, params):
    policy = random_logprobs(3, 6).requires_grad_()
    target = random_logprobs(3, 6, generator_seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q: D.get(name)(p, q, **params), (policy, target))


def test_gradcheck_f_divergence_with_a_user_generator():
    policy = random_logprobs(3, 6).requires_grad_()
    target = random_logprobs(3, 6, generator_seed=1).requires_grad_()
    f = lambda t: t * torch.log(t) - t + 1  # noqa: E731  (generalized KL; sums to KL(p‖q))
    assert torch.autograd.gradcheck(lambda p, q: D.f_divergence(p, q, f=f), (policy, target))


# --- agreement with TRL -----------------------------------------------------------------------


def trl_generalized_jsd(student_logits, teacher_logits, beta):
    """TRL's GKDTrainer.generalized_jsd_loss (temperature 1, no reduction), summed over the vocabulary.

    Restated from huggingface/trl, trl/trainer/gkd_trainer.py at commit
    a9fa292c2d1df64c6f0189ebe32d37b46ce64438. F.kl_div(a, b, log_target=True) = Σ e^b (b − a), i.e.
    KL(b‖a): β = 0 → KL(teacher‖student), β = 1 → KL(student‖teacher), else the mixture
    m = (1−β)·student + β·teacher (in log space by logsumexp) and β·KL(teacher‖m) + (1−β)·KL(student‖m).
    """
    student, teacher = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    if beta == 0:
        loss = F.kl_div(student, teacher, reduction="none", log_target=True)
    elif beta == 1:
        loss = F.kl_div(teacher, student, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=student.dtype)
        mixture = torch.logsumexp(torch.stack([student + torch.log(1 - b), teacher + torch.log(b)]), dim=0)
        loss = b * F.kl_div(mixture, teacher, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            mixture, student, reduction="none", log_target=True
        )
    return loss.sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_generalized_jsd_loss(beta):
    gen = torch.Generator().manual_seed(3)
    student_logits = 3 * torch.randn(2, 5, 50, generator=gen, dtype=F64)
    teacher_logits = 3 * torch.randn(2, 5, 50, generator=gen, dtype=F64)
    ours = D.jsd(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), beta=beta)
    torch.testing.assert_close(ours, trl_generalized_jsd(student_logits, teacher_logits, beta), rtol=1e-12, atol=1e-14)


# --- Sinkhorn ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_sinkhorn_with_zero_one_cost_tends_to_total_variation(seed):
    policy = random_logprobs(3, 6, generator_seed=seed)
    target = random_logprobs(3, 6, generator_seed=seed + 100)
    policy = policy.masked_fill(torch.rand(3, 6, generator=torch.Generator().manual_seed(seed)) < 0.3, -INF)
    policy = policy.log_softmax(-1)
    zero_one = 1 - torch.eye(6, dtype=F64)
    tv = D.total_variation(policy, target)
    errors = [(D.sinkhorn(policy, target, zero_one, epsilon=e, iterations=3000) - tv).abs().max() for e in (1e-2, 1e-3)]
    assert errors[1] < 1e-3  # the entropic bias shrinks linearly with ε
    assert errors[1] < errors[0] / 5


def test_sinkhorn_is_finite_with_finite_useful_gradient_on_disjoint_supports():
    logits_p = torch.tensor([0.0, 1.0, 0.5, -INF, -INF, -INF], dtype=F64, requires_grad=True)
    logits_q = torch.tensor([-INF, -INF, -INF, 2.0, 0.0, 1.0], dtype=F64)
    positions = torch.arange(6, dtype=F64)
    line_cost = (positions[:, None] - positions[None, :]).abs()  # earth mover's distance on a line
    value = D.sinkhorn(logits_p.log_softmax(-1), logits_q.log_softmax(-1), line_cost, epsilon=0.05, iterations=300)
    assert D.reverse_kl(logits_p.log_softmax(-1), logits_q.log_softmax(-1)) == INF
    assert value.isfinite()
    (grad,) = torch.autograd.grad(value, logits_p)
    assert grad.isfinite().all()
    assert grad[2] < 0 < grad[0]  # mass should move toward q's tokens, i.e. to the right
    with torch.no_grad():
        stepped = logits_p - 0.1 * grad
    assert (
        D.sinkhorn(stepped.log_softmax(-1), logits_q.log_softmax(-1), line_cost, epsilon=0.05, iterations=300) < value
    )


def test_sinkhorn_gradcheck_at_convergence():
    positions = torch.arange(5, dtype=F64)
    cost = (positions[:, None] - positions[None, :]) ** 2 / 4
    logits_p = torch.randn(2, 5, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    logits_q = torch.randn(2, 5, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()

    def value(a, b):
        return D.sinkhorn(a.log_softmax(-1), b.log_softmax(-1), cost, epsilon=0.5, iterations=300)

    assert torch.autograd.gradcheck(value, (logits_p, logits_q))


def entropic_ot_reference(p, q, cost, epsilon, iterations=5000):
    """OT_ε(p, q) = ⟨P, C⟩ + ε·KL(P‖p⊗q) of the plan P = diag(p·a) K diag(q·b), K = e^{−C/ε} (0 where
    C = +inf), from plain (not log-domain) Sinkhorn scalings a, b in float64."""
    kernel = torch.exp(-cost / epsilon)
    a, b = torch.ones_like(p), torch.ones_like(q)
    for _ in range(iterations):
        a = 1 / (kernel @ (q * b))
        b = 1 / (kernel.T @ (p * a))
    plan = (p * a)[:, None] * kernel * (q * b)[None, :]
    moved = plan > 0
    return (plan[moved] * (cost[moved] + epsilon * torch.log(plan[moved] / torch.outer(p, q)[moved]))).sum()


def test_sinkhorn_with_forbidden_moves_matches_the_float64_reference():
    """C_ij = +inf forbids a move (ε-scaling once started at max C = inf: NaN). With tokens 0 ↔ 2
    forbidden, p = (½, ½, 0) and q = (0, ½, ½) have one coupling, ½ on 0→1 and ½ on 1→2: OT_ε = 1 +
    ε log 2; p = (1, 0, 0), q = (0, 1, 0) have 1 on 0→1: OT_ε = 1 (token 2 of q unreachable from p's
    support: its potential is +inf); random p, q against the plain float64 Sinkhorn reference."""
    cost = 1 - torch.eye(3, dtype=F64)
    cost[0, 2] = cost[2, 0] = INF
    cases = [([0.5, 0.5, 0.0], [0.0, 0.5, 0.5], 1 + 0.05 * math.log(2)), ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], 1.0)]
    for p, q, exact in cases:
        logits_p = torch.tensor(p, dtype=F64).log().requires_grad_()
        value = D.sinkhorn(logits_p, torch.tensor(q, dtype=F64).log(), cost, epsilon=0.05, iterations=200)
        torch.testing.assert_close(value, torch.tensor(exact, dtype=F64), rtol=1e-9, atol=0)
        assert torch.autograd.grad(value, logits_p)[0].isfinite().all()
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(5, 5, dtype=F64, generator=gen).masked_fill(torch.eye(5, dtype=torch.bool).roll(2, 1), INF)
    logits_p = torch.randn(5, dtype=F64, generator=gen).requires_grad_()
    logits_q = torch.randn(5, dtype=F64, generator=gen).requires_grad_()

    def value(a, b):
        return D.sinkhorn(a.log_softmax(-1), b.log_softmax(-1), cost, epsilon=0.3, iterations=300)

    want = entropic_ot_reference(logits_p.softmax(-1), logits_q.softmax(-1), cost, 0.3)
    torch.testing.assert_close(value(logits_p, logits_q), want, rtol=1e-9, atol=0)
    assert torch.autograd.gradcheck(value, (logits_p, logits_q))


def test_sinkhorn_accepts_a_token_cost_callable_and_topk_equals_it_when_the_support_fits():
    vocab, hidden = 40, 8
    embeddings = torch.randn(vocab, hidden, dtype=F64, generator=torch.Generator().manual_seed(0))
    cost = D.embedding_cost(embeddings)
    ids = torch.arange(vocab)
    table = cost(ids, ids)
    assert table.diagonal().abs().max() < 1e-12 and table.min() > -1e-12 and table.max() <= 2
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, vocab, dtype=F64, generator=gen)
    support = torch.rand(2, 3, vocab, generator=gen) < 0.15
    support[..., 0] = True
    policy = logits.masked_fill(~support, -INF).log_softmax(-1)
    target = torch.randn(2, 3, vocab, dtype=F64, generator=gen).masked_fill(~support, -INF).log_softmax(-1)
    k = int(support.sum(-1).max())
    full = D.sinkhorn(policy, target, cost, epsilon=0.05, iterations=200)
    torch.testing.assert_close(full, D.sinkhorn(policy, target, table, epsilon=0.05, iterations=200))
    torch.testing.assert_close(D.sinkhorn_topk(policy, target, cost, k=k, epsilon=0.05, iterations=200), full)
    torch.testing.assert_close(D.sinkhorn_topk(policy, target, table, k=k, epsilon=0.05, iterations=200), full)


def test_sinkhorn_topk_runs_at_a_real_vocabulary_size():
    vocab = 49152
    embeddings = torch.randn(vocab, 64, generator=torch.Generator().manual_seed(0))
    policy = random_logprobs(4, vocab, dtype=torch.float32).requires_grad_()
    target = random_logprobs(4, vocab, generator_seed=1, dtype=torch.float32)
    value = D.sinkhorn_topk(policy, target, D.embedding_cost(embeddings), k=16, epsilon=0.05, iterations=50)
    assert value.shape == (4,) and value.isfinite().all() and (value > 0).all()
    (grad,) = torch.autograd.grad(value.sum(), policy)
    assert grad.isfinite().all() and (grad != 0).sum() <= 4 * 32


# --- sampled estimators -----------------------------------------------------------------------


def tabular(seed):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(5, dtype=F64, generator=gen).requires_grad_()
    target = torch.randn(5, dtype=F64, generator=gen).log_softmax(-1)
    return theta, target


def exact_expectation(estimator, policy, target):
    """E_{y~p}[k(log p(y), log q(y))] summed over all 5 tokens, with the sampling weight p detached."""
    return (policy.detach().exp() * estimator(policy, target)).sum()


@pytest.mark.parametrize("seed", range(3))
def test_k1_and_k3_are_unbiased_for_the_value_k2_is_not(seed):
    theta, target = tabular(seed)
    policy = theta.log_softmax(-1)
    kl = D.reverse_kl(policy, target)
    torch.testing.assert_close(exact_expectation(D.k1, policy, target), kl)
    torch.testing.assert_close(exact_expectation(D.k3, policy, target), kl)
    assert not torch.isclose(exact_expectation(D.k2, policy, target), kl)
    assert (D.k3(policy, target) >= 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_estimator_gradients_as_on_policy_losses(seed):
    theta, target = tabular(seed)

    def grad_of(loss_fn):
        return torch.autograd.grad(loss_fn(theta.log_softmax(-1)), theta)[0]

    reverse_grad = grad_of(lambda lp: D.reverse_kl(lp, target))
    forward_grad = grad_of(lambda lp: D.forward_kl(lp, target))
    assert not torch.allclose(reverse_grad, forward_grad)
    expected = {"k1": torch.zeros(5, dtype=F64), "k2": reverse_grad, "k3": forward_grad}
    expected |= {"k1_st": reverse_grad, "k3_st": reverse_grad}
    for name, want in expected.items():
        got = grad_of(lambda lp, name=name: exact_expectation(D.get_estimator(name), lp, target))
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=name)


def test_straight_through_keeps_its_own_value_and_k2s_gradient_per_sample():
    policy = torch.tensor([-0.3, -2.0, -5.0], dtype=F64, requires_grad=True)
    target = torch.tensor([-1.0, -0.1, -5.0], dtype=F64)
    assert D.straight_through(D.k3).__name__ == "k3_st"
    for value_fn, st_fn in [(D.k1, D.k1_st), (D.k3, D.k3_st)]:
        torch.testing.assert_close(st_fn(policy, target), value_fn(policy, target))
        got = torch.autograd.grad(st_fn(policy, target).sum(), policy)[0]
        want = torch.autograd.grad(D.k2(policy, target).sum(), policy)[0]
        torch.testing.assert_close(got, want)


def test_estimators_handle_zero_probabilities_without_nan():
    policy = torch.tensor([-0.5, -INF, -INF, -1.0], dtype=F64, requires_grad=True)
    target = torch.tensor([-INF, -0.5, -INF, -1.0], dtype=F64)
    for name in ("k1", "k2", "k3", "k1_st", "k3_st"):
        value = D.get_estimator(name)(policy, target)
        assert not value.isnan().any(), name
        assert value[3] == 0 and value[2] == 0, name  # equal log-probs, including 0 = 0
        (grad,) = torch.autograd.grad(value[2:].sum(), policy)
        assert not grad.isnan().any(), name
    assert D.k3(policy, target)[0] == INF and D.k3(policy, target)[1] == INF
    assert D.k1(policy, target)[0] == INF and D.k2(policy, target)[0] == INF


def test_chi2_and_alpha_in_float16_match_float64_to_its_rounding():
    """float16 chi2/alpha terms are computed in float32 and cast back: alpha(2) at p = 1, log q =
    −11.5 is 49356.9 (an intermediate p/q = 98715 overflowed: inf), and chi2's gradient at log p =
    −1.459, log q = −13.32 is 65873, beyond float16's 65504: +inf, not NaN."""
    f16 = torch.float16
    cases = [("alpha", {"alpha": 2.0}, 0.0, -11.5), ("alpha", {"alpha": -1.0}, -11.5, 0.0)]
    cases += [("chi2", {}, -1.458984375, -13.3203125), ("chi2", {}, -1.458984375, -12.0)]
    for name, params, log_p, log_q in cases:
        policy = torch.tensor([log_p], dtype=f16, requires_grad=True)
        policy64 = torch.tensor([log_p], dtype=F64, requires_grad=True)
        term = D.pointwise(name, **params)(policy, torch.tensor([log_q], dtype=f16))
        term64 = D.pointwise(name, **params)(policy64, torch.tensor([log_q], dtype=F64))
        assert term.dtype == f16
        torch.testing.assert_close(term.double(), term64, rtol=1e-3, atol=0)
        (grad,) = torch.autograd.grad(term.sum(), policy)
        (grad64,) = torch.autograd.grad(term64.sum(), policy64)
        if grad64.abs() > torch.finfo(f16).max:
            assert grad == math.copysign(INF, grad64.item())
        else:
            torch.testing.assert_close(grad.double(), grad64, rtol=2e-3, atol=0)
