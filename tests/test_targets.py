"""divrl.targets: hand-computed 3-token targets, closed-form identities, −inf handling, shapes, gradients."""

import math

import pytest
import torch

from divrl import divergences as D
from divrl import targets as T

F64 = torch.float64
INF = math.inf


def logprobs(*probs):
    return torch.tensor(probs, dtype=F64).log()


def assert_probs(logq, *expected):
    torch.testing.assert_close(logq.exp(), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


def random_logprobs(*shape, seed=0, zeros=False):
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(*shape, generator=gen, dtype=F64)
    if zeros:  # about a third of the entries zero, never a whole row
        zero = torch.rand(*shape, generator=gen) < 0.35
        zero[..., 0] = False
        logits = logits.masked_fill(zero, -INF)
    return logits.log_softmax(-1)


# ---------------------------------------------------------------------------------------------
# Hand-computed examples.


def test_tilt_by_hand():
    # β = 1/ln 2 makes exp(A/β) = 2^A = (1, 2, 4): q ∝ (0.5, 0.5, 1).
    q = T.tilt(logprobs(0.5, 0.25, 0.25), torch.tensor([0.0, 1.0, 2.0], dtype=F64), 1 / math.log(2))
    assert_probs(q, 0.25, 0.25, 0.5)


def test_tilt_keeps_the_support_of_base():
    q = T.tilt(logprobs(0.5, 0.5, 0.0), torch.tensor([0.0, 0.0, 100.0], dtype=F64), 0.1)
    assert_probs(q, 0.5, 0.5, 0.0)


def test_extrapolate_by_hand():
    ref, teacher = logprobs(0.5, 0.25, 0.25), logprobs(0.25, 0.25, 0.5)
    # λ = 2: q ∝ teacher²/ref = (1/8, 1/4, 1) → (1, 2, 8)/11.
    assert_probs(T.extrapolate(ref, teacher, 2.0), 1 / 11, 2 / 11, 8 / 11)
    # λ = ½: q ∝ √(ref·teacher) = (1/(2√2), 1/4, 1/(2√2)).
    root = 1 / (2 * math.sqrt(2))
    total = 2 * root + 0.25
    assert_probs(T.extrapolate(ref, teacher, 0.5), root / total, 0.25 / total, root / total)


def test_extrapolate_zero_mass_rule():
    ref, teacher = logprobs(0.5, 0.25, 0.25), logprobs(0.5, 0.5, 0.0)
    # Teacher zero, λ = 2: q ∝ teacher²/ref = (0.5, 1, 0) → (1/3, 2/3, 0).
    assert_probs(T.extrapolate(ref, teacher, 2.0), 1 / 3, 2 / 3, 0.0)
    # Ref zero, λ = 2 (where ref^{1−λ} would be +∞): q = 0 there; q ∝ (2/16, 2/16).
    assert_probs(T.extrapolate(logprobs(0.5, 0.5, 0.0), logprobs(0.25, 0.25, 0.5), 2.0), 0.5, 0.5, 0.0)
    # Ref zero, λ = ½: the formula itself gives 0.
    assert_probs(T.extrapolate(logprobs(0.5, 0.5, 0.0), logprobs(0.25, 0.25, 0.5), 0.5), 0.5, 0.5, 0.0)


def test_extrapolate_disjoint_supports_have_no_mass_and_zero_gradient():
    ref = logprobs(0.5, 0.5, 0.0).requires_grad_()
    teacher = logprobs(0.0, 0.0, 1.0).requires_grad_()
    q = T.extrapolate(ref, teacher, 2.0)
    assert torch.equal(q, torch.full((3,), -INF, dtype=F64))
    q.exp().sum().backward()
    assert torch.equal(ref.grad, torch.zeros(3, dtype=F64))
    assert torch.equal(teacher.grad, torch.zeros(3, dtype=F64))


def test_mix_by_hand():
    assert_probs(T.mix(logprobs(0.5, 0.5, 0.0), logprobs(0.0, 0.0, 1.0), 0.25), 0.375, 0.375, 0.25)
    assert_probs(T.mix(logprobs(0.6, 0.4, 0.0), logprobs(0.2, 0.2, 0.6), 0.5), 0.4, 0.3, 0.3)


def test_mix_of_a_token_both_rule_out_is_exactly_zero():
    q = T.mix(logprobs(1.0, 0.0, 0.0), logprobs(0.0, 1.0, 0.0), 0.25)
    assert_probs(q, 0.75, 0.25, 0.0)
    assert q[2] == -INF


def test_filter_by_hand():
    p = logprobs(0.6, 0.3, 0.1)
    assert_probs(T.filter(p, 0.2), 2 / 3, 1 / 3, 0.0)
    assert_probs(T.filter(p, 0.05), 0.6, 0.3, 0.1)
    assert_probs(T.filter(p, 0.0), 0.6, 0.3, 0.1)
    # Relative: τ = min_p·0.6.
    assert_probs(T.filter(p, 0.4, relative=True), 2 / 3, 1 / 3, 0.0)  # τ = 0.24
    assert_probs(T.filter(p, 0.6, relative=True), 1.0, 0.0, 0.0)  # τ = 0.36
    assert_probs(T.filter(p, 0.1, relative=True), 0.6, 0.3, 0.1)  # τ = 0.06


def test_filter_keeps_a_token_exactly_at_the_threshold():
    p = logprobs(0.5, 0.25, 0.25)  # powers of two: τ = 0.25 exactly in log space
    assert_probs(T.filter(p, 0.25), 0.5, 0.25, 0.25)
    assert_probs(T.filter(p, 0.5, relative=True), 0.5, 0.25, 0.25)


def test_filter_always_keeps_the_most_probable_tokens():
    assert_probs(T.filter(logprobs(0.3, 0.5, 0.2), 0.9), 0.0, 1.0, 0.0)  # min_p above max p
    assert_probs(T.filter(logprobs(0.4, 0.4, 0.2), 0.9), 0.5, 0.5, 0.0)  # ties at the max


def test_filter_is_lp_reg_proxy():
    """methods notes, Lp-Reg: KL(q‖p) = −log(mass kept), and KL(p‖q) = +inf once anything is filtered."""
    p = logprobs(0.6, 0.3, 0.08, 0.02)
    q = T.filter(p, 0.1, relative=True)  # τ = 0.06: drops 0.02
    torch.testing.assert_close(D.forward_kl(p, q), torch.tensor(-math.log(0.98), dtype=F64))
    assert D.reverse_kl(p, q) == INF


def test_temperature_by_hand():
    p = logprobs(0.5, 0.25, 0.25)
    assert_probs(T.temperature(p, 0.5), 2 / 3, 1 / 6, 1 / 6)  # ∝ p²
    root = math.sqrt(0.5)
    assert_probs(T.temperature(p, 2.0), root / (root + 1), 0.5 / (root + 1), 0.5 / (root + 1))  # ∝ √p
    assert_probs(T.temperature(logprobs(0.5, 0.5, 0.0), 3.0), 0.5, 0.5, 0.0)


# ---------------------------------------------------------------------------------------------
# Identities and limits.


def test_tilt_with_zero_or_constant_advantage_is_the_base():
    base = random_logprobs(2, 3, 5, zeros=True)
    torch.testing.assert_close(T.tilt(base, torch.zeros(2, 3, 5, dtype=F64), 0.3), base)
    torch.testing.assert_close(T.tilt(base, torch.randn(2, 3, 1, dtype=F64), 0.3), base)


def test_extrapolate_endpoints_are_the_inputs_exactly():
    ref, teacher = random_logprobs(4, 6, seed=1, zeros=True), random_logprobs(4, 6, seed=2, zeros=True)
    assert torch.equal(T.extrapolate(ref, teacher, 0.0), ref)
    assert torch.equal(T.extrapolate(ref, teacher, 1.0), teacher)


@pytest.mark.parametrize("lam", [0.3, 0.5, 2.0, 3.5])
def test_extrapolate_is_tilt_with_the_log_ratio_reward(lam):
    """methods notes C7: extrapolate(ref, teacher, λ) = tilt(ref, log teacher − log ref, 1/λ)."""
    ref, teacher = random_logprobs(2, 3, 7, seed=3), random_logprobs(2, 3, 7, seed=4)
    torch.testing.assert_close(T.extrapolate(ref, teacher, lam), T.tilt(ref, teacher - ref, 1 / lam))


def test_mix_endpoints_are_the_inputs_exactly():
    a, b = random_logprobs(3, 5, seed=5, zeros=True), random_logprobs(3, 5, seed=6, zeros=True)
    assert torch.equal(T.mix(a, b, 0.0), a)
    assert torch.equal(T.mix(a, b, 1.0), b)


def test_temperature_one_is_the_input():
    p = random_logprobs(3, 5, seed=7, zeros=True)
    torch.testing.assert_close(T.temperature(p, 1.0), p)


# ---------------------------------------------------------------------------------------------
# Every target on the same inputs: normalized, shape-agnostic, −inf-safe, correct gradients.

TARGETS = {
    "tilt": lambda a, b: T.tilt(a, b.exp() * 3.0, 0.7),
    "extrapolate_half": lambda a, b: T.extrapolate(a, b, 0.5),
    "extrapolate_two": lambda a, b: T.extrapolate(a, b, 2.0),
    "mix": lambda a, b: T.mix(a, b, 0.3),
    "filter": lambda a, b: T.filter(a, 0.1),
    "filter_relative": lambda a, b: T.filter(a, 0.2, relative=True),
    "temperature": lambda a, b: T.temperature(a, 1.7),
}


@pytest.fixture(params=sorted(TARGETS))
def target(request):
    return TARGETS[request.param]


def overlapping_pair(*shape):
    """Two log-prob tensors with zeros, sharing at least token 0 (so every target has mass)."""
    return random_logprobs(*shape, seed=8, zeros=True), random_logprobs(*shape, seed=9, zeros=True)


def test_outputs_are_normalized(target):
    a, b = overlapping_pair(4, 6)
    q = target(a, b)
    torch.testing.assert_close(q.logsumexp(-1), torch.zeros(4, dtype=F64))
    assert not q.isnan().any() and (q < INF).all()


def test_any_leading_shape(target):
    a, b = overlapping_pair(2, 3, 6)
    q = target(a, b)
    assert q.shape == (2, 3, 6)
    torch.testing.assert_close(q.reshape(6, 6), target(a.reshape(6, 6), b.reshape(6, 6)))


def test_zero_mass_inputs_give_finite_gradients(target):
    a, b = overlapping_pair(4, 6)
    a.requires_grad_(), b.requires_grad_()
    q = target(a, b)
    weights = torch.randn(4, 6, dtype=F64)
    # Probabilities and finite log-probabilities (where-masked, as a consumer would) both backpropagate.
    loss = (weights * q.exp()).sum() + (weights * torch.where(q.isfinite(), q, 0.0)).sum()
    loss.backward()
    for grad in (a.grad, b.grad):
        assert grad is None or grad.isfinite().all()


def test_disjoint_supports_give_finite_outputs_and_gradients():
    a = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64).log().requires_grad_()
    b = torch.tensor([0.0, 0.0, 0.25, 0.75], dtype=F64).log().requires_grad_()
    q = T.mix(a, b, 0.2)
    assert_probs(q, 0.4, 0.4, 0.05, 0.15)
    (q * torch.arange(4.0, dtype=F64)).sum().backward()
    assert a.grad.isfinite().all() and b.grad.isfinite().all()


def test_gradcheck(target):
    """float64 gradcheck through unconstrained logits with a fixed zero pattern (a zero's gradient is 0)."""
    gen = torch.Generator().manual_seed(10)
    logits_a = torch.randn(3, 5, generator=gen, dtype=F64, requires_grad=True)
    logits_b = torch.randn(3, 5, generator=gen, dtype=F64, requires_grad=True)
    zero_a = torch.tensor([False, False, True, False, False]).expand(3, 5)
    zero_b = torch.tensor([False, True, False, False, True]).expand(3, 5)

    def probs(la, lb):
        return target(la.masked_fill(zero_a, -INF).log_softmax(-1), lb.masked_fill(zero_b, -INF).log_softmax(-1)).exp()

    assert torch.autograd.gradcheck(probs, (logits_a, logits_b))


def test_gradcheck_tilt_in_the_advantage():
    base = random_logprobs(3, 4, seed=11, zeros=True)
    advantage = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda adv: T.tilt(base, adv, 0.5).exp(), (advantage,))


# ---------------------------------------------------------------------------------------------
# Parameter validation.


@pytest.mark.parametrize(
    "call, parameter",
    [
        (lambda p: T.tilt(p, p, 0.0), "beta"),
        (lambda p: T.tilt(p, p, -1.0), "beta"),
        (lambda p: T.extrapolate(p, p, math.nan), "lam"),
        (lambda p: T.extrapolate(p, p, -0.5), "lam"),
        (lambda p: T.mix(p, p, -0.1), "alpha"),
        (lambda p: T.mix(p, p, 1.5), "alpha"),
        (lambda p: T.filter(p, -0.1), "min_p"),
        (lambda p: T.filter(p, 1.0), "min_p"),
        (lambda p: T.temperature(p, 0.0), "T"),
        (lambda p: T.temperature(p, INF), "T"),
    ],
)
def test_invalid_parameters_raise(call, parameter):
    with pytest.raises(ValueError, match=rf"\b{parameter}\b"):
        call(logprobs(0.5, 0.25, 0.25))


def test_reward_power_keeps_the_base_for_a_pass_and_flattens_it_for_a_failure():
    base = torch.tensor([0.7, 0.2, 0.1, 0.0]).log()
    rewards = torch.tensor([[1.0], [0.0], [0.5]])
    q = T.reward_power(base.expand(3, 4), rewards, floor=0.5).exp()
    torch.testing.assert_close(q[0], base.exp())  # φ(1) = 1
    half = torch.tensor([0.7, 0.2, 0.1]).sqrt()  # φ(0) = 0.5: q ∝ p^0.5 on supp(p)
    torch.testing.assert_close(q[1], torch.cat([half / half.sum(), torch.zeros(1)]))
    three_quarters = torch.tensor([0.7, 0.2, 0.1]) ** 0.75  # φ(0.5) = 0.75
    torch.testing.assert_close(q[2], torch.cat([three_quarters / three_quarters.sum(), torch.zeros(1)]))
    flat = T.reward_power(base, 0.0, floor=0.0).exp()  # floor 0: uniform on the support
    torch.testing.assert_close(flat, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    with pytest.raises(ValueError, match="floor must lie in \\[0, 1\\]"):
        T.reward_power(base, 1.0, floor=1.5)


def test_uniform_target_makes_reverse_kl_the_entropy_deficit():
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125, 0.0]]).log()
    torch.testing.assert_close(T.uniform(p).exp(), torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0]]))
    logp = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]]).log()
    entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1) + 2 * 0.05 * math.log(0.05))
    got = D.get("reverse_kl")(logp, T.uniform(logp))  # full support: log 5 − H
    torch.testing.assert_close(got, torch.tensor([math.log(5) - entropy]))
