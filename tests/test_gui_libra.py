"""GUI-Libra (arXiv 2602.22190): the `success_adaptive` weight on hand-computed numbers, the
recipe's objective on a toy batch, its equality with GRPO + k3 where every group succeeds at least
a third of the time, and the exact expected step of a bandit against its closed form."""

import dataclasses
import itertools
import math

import pytest
import torch

from divrl import objectives, recipes
from divrl import weights as W
from divrl.chunked import Head
from divrl.config import build_config
from divrl.rowwise import ModelOutputs

F64 = torch.float64
V, H = 5, 3
TOKENS = torch.tensor([0, 3, 1, 4, 4, 2, 0, 1])  # completions of lengths 2, 1, 3, 2
LENGTHS = [2, 1, 3, 2]
ROWS = torch.repeat_interleave(torch.arange(4), torch.tensor(LENGTHS))


def _spec(recipe, group_size, *overrides):
    config = ["group_size=" + str(group_size), "max_new_tokens=4", *overrides]
    return build_config(None, config, recipe=recipe).objective


def _stats(rewards, group_size, rows=None):
    rewards = torch.tensor(rewards, dtype=F64)
    n = len(rewards)
    return W.TokenStats(
        rows=torch.arange(n) if rows is None else rows,
        advantages=objectives.group_advantages(rewards, group_size),
        rewards=rewards,
        group_pass_rate=objectives.group_pass_rate(objectives.passed(rewards), group_size),
        groups=torch.arange(n) // group_size,
    )


def _weight(stats, **params):
    return W.compute([("success_adaptive", params)], stats)


# ---------------------------------------------------------------------------------------------
# The weight by hand.


def test_success_adaptive_scales_negatives_by_the_group_mean_reward():
    # groups of 4: (1, 0, 0, 0) r̄ = 0.25 → s = min(0.5 + 1.5·0.25, 1) = 0.875 on the three failures;
    # (1, 1, 0, 0) r̄ = 0.5 → s = 1 (≥ 1/3 saturates); (0, 0, 0, 0) A = 0 → 1 (no advantage anyway)
    stats = _stats([1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], 4)
    expected = [1, 0.875, 0.875, 0.875, 1, 1, 1, 1, 1, 1, 1, 1]
    torch.testing.assert_close(_weight(stats), torch.tensor(expected, dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(_weight(stats), _weight(stats, base=0.5, coef=1.5), rtol=0, atol=0)
    # the advantage itself is GRPO's: A = (0.75, −0.25, …)/(0.5 + 1e-6)
    assert stats.advantages[0].item() == pytest.approx(0.75 / (0.5 + 1e-6), rel=1e-15)


def test_success_adaptive_at_zero_mean_clamps_and_reads_the_reward_not_the_pass_rate():
    # r̄ = 0 → s(0) = λ0 = 0.5 on the negative; the positive keeps 1
    torch.testing.assert_close(_weight(_stats([0.5, -0.5], 2)), torch.tensor([1.0, 0.5], dtype=F64))
    # r̄ = −0.5 → 0.5 − 0.75 < 0 → clamped to 0
    torch.testing.assert_close(_weight(_stats([-0.25, -0.75], 2)), torch.tensor([1.0, 0.0], dtype=F64))
    # partial credit (0.9, 0.1, 0.1, 0.1): nothing passes (p̂ = 0) but r̄ = 0.3 → s = 0.95
    got = _weight(_stats([0.9, 0.1, 0.1, 0.1], 4))
    torch.testing.assert_close(got, torch.tensor([1.0, 0.95, 0.95, 0.95], dtype=F64), rtol=1e-14, atol=0)
    # other parameters: base 0, coef 1 → s = r̄ = 0.25
    torch.testing.assert_close(
        _weight(_stats([1, 0, 0, 0], 4), base=0.0, coef=1.0), torch.tensor([1, 0.25, 0.25, 0.25], dtype=F64)
    )


def test_success_adaptive_is_per_completion_on_its_tokens_and_needs_groups():
    stats = _stats([1, 0, 0, 0], 4, rows=ROWS)
    torch.testing.assert_close(
        _weight(stats), torch.tensor([1, 1, 0.875, 0.875, 0.875, 0.875, 0.875, 0.875], dtype=F64)
    )
    with pytest.raises(ValueError, match="groups"):
        _weight(dataclasses.replace(stats, groups=None))
    W.check("success_adaptive", {"base": -1.0, "coef": 3})  # any finite reals (the clamp bounds s)
    with pytest.raises(ValueError, match="coef"):
        W.check("success_adaptive", {"coef": math.inf})


# ---------------------------------------------------------------------------------------------
# The recipe.


def test_recipe_is_grpo_with_clip_0_2_k3_kl_and_the_success_adaptive_weight():
    recipe = recipes.load("gui-libra")
    assert "2602.22190" in recipe.paper
    spec = _spec("gui-libra", 4)
    assert spec.pg_weight == (("success_adaptive", {"base": 0.5, "coef": 1.5}),)
    assert (spec.advantage, spec.advantage_std, spec.clip_low, spec.clip_high, spec.aggregation) == (
        "group_norm",
        "sample",
        0.2,
        0.2,
        "token_mean",
    )
    (term,) = spec.terms
    assert (term.divergence, term.target.op, term.estimator, term.coef, term.placement) == (
        "reverse_kl",
        "reference",
        "k3",
        0.001,
        "loss",
    )
    config = build_config(None, [], recipe="gui-libra")
    assert (config.group_size, config.top_p, config.temperature) == (8, 1.0, 1.0)  # paper G = 8, T = 1
    # the paper's top-p 0.98 with a sampled KL is refused (the nucleus is not πθ); exact KL allows it
    with pytest.raises(ValueError, match="top_p"):
        build_config(None, ["top_p=0.98"], recipe="gui-libra")
    build_config(None, ["top_p=0.98", "kl_estimator=exact"], recipe="gui-libra")
    # without the weight the spec is GRPO's with symmetric clip and k3
    grpo = _spec("grpo", 4, "kl_estimator=k3", "clip_high=0.2")
    assert dataclasses.replace(spec, pg_weight=()) == grpo


def _toy(spec, rewards, group_size, off_policy=False):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(len(TOKENS), H, dtype=F64, generator=gen).requires_grad_()
    head = Head(torch.randn(V, H, dtype=F64, generator=gen))
    reference = ModelOutputs(
        torch.randn(len(TOKENS), H, dtype=F64, generator=gen), Head(torch.randn(V, H, dtype=F64, generator=gen))
    )
    rewards = torch.tensor(rewards, dtype=F64)
    logp = head.logits(hidden).log_softmax(-1).gather(-1, TOKENS[:, None]).squeeze(-1)
    old = (logp.detach() + 0.3 * torch.randn(len(TOKENS), dtype=F64, generator=gen)) if off_policy else None
    inputs = objectives.ObjectiveInputs(
        policy=ModelOutputs(hidden, head),
        tokens=TOKENS,
        rows=ROWS,
        advantages=objectives.advantages(spec, rewards, None, group_size),
        rewards=rewards,
        group_pass_rate=objectives.group_pass_rate(objectives.passed(rewards), group_size),
        token_scale=objectives.token_scale(spec, LENGTHS).double(),
        old_logprobs=old,
        models={"reference": reference},
        groups=torch.arange(len(rewards)) // group_size,
    )
    return inputs, logp


def test_recipe_objective_by_hand_on_a_group_with_one_pass_in_four():
    spec = _spec("gui-libra", 4, "kl_coef=0")  # the PG part alone (the KL is checked below)
    rewards = [1.0, 0.0, 0.0, 0.0]
    inputs, logp = _toy(spec, rewards, 4)
    a = 1 / (0.5 + 1e-6)  # std (unbiased) of (1, 0, 0, 0) = 0.5
    per_completion = torch.tensor([0.75 * a, -0.25 * a * 0.875, -0.25 * a * 0.875, -0.25 * a * 0.875], dtype=F64)
    coefficient = per_completion[ROWS] / len(TOKENS)  # token mean
    out = objectives.objective_loss(spec, inputs)
    assert out.loss_parts["pg"] == pytest.approx(-coefficient.sum().item(), rel=1e-12)
    (got,) = torch.autograd.grad(out.loss, inputs.policy.hidden)
    (expected,) = torch.autograd.grad(-(coefficient * logp).sum(), inputs.policy.hidden)
    torch.testing.assert_close(got, expected)
    # the moving part is logged: Σ_t w_t = 2·1 + 6·0.875 (the trainer divides by the token count)
    assert out.token_sums["pg_mean_weight"] == pytest.approx(2 + 6 * 0.875)
    full = objectives.objective_loss(_spec("gui-libra", 4), inputs)
    assert full.loss_parts["reverse_kl_to_reference"] > 0  # the k3 trust region is on


@pytest.mark.parametrize("off_policy", [False, True])
def test_recipe_equals_grpo_with_k3_where_every_group_succeeds_a_third_of_the_time(off_policy):
    # groups of 2: (1, 0), (0, 1): r̄ = 0.5 ≥ 1/3 → s = 1, so GUI-Libra is GRPO + 1e-3·k3, clip 0.2
    rewards = [1.0, 0.0, 0.0, 1.0]
    gui, grpo = _spec("gui-libra", 2), _spec("grpo", 2, "kl_estimator=k3", "clip_high=0.2")
    results = []
    for spec in (gui, grpo):
        inputs, _ = _toy(spec, rewards, 2, off_policy=off_policy)
        out = objectives.objective_loss(spec, inputs)
        (grad,) = torch.autograd.grad(out.loss, inputs.policy.hidden)
        results.append((out.loss.detach(), grad, out.loss_parts))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert results[0][2] == results[1][2]
    # and with a group below a third, it is not: (1, 0, 0, 0) scales the failures by 0.875
    inputs, _ = _toy(_spec("gui-libra", 4), [1.0, 0.0, 0.0, 0.0], 4, off_policy=off_policy)
    grpo4, gui4 = _spec("grpo", 4, "kl_estimator=k3", "clip_high=0.2"), _spec("gui-libra", 4)
    assert objectives.objective_loss(gui4, inputs).loss_parts["pg"] != pytest.approx(
        objectives.objective_loss(grpo4, inputs).loss_parts["pg"]
    )


# ---------------------------------------------------------------------------------------------
# Lab: the exact expected step of a one-prompt bandit over all groups of G samples.


def _expected_gradient(spec, logits, reward, group_size):
    """E over all V^G groups drawn from softmax(logits) of ∇_logits of `objective_loss` (one token
    per completion, the reference at the policy, so the k3 term's gradient vanishes)."""
    vocab = len(logits)
    probs = logits.softmax(-1)
    total = torch.zeros(vocab, dtype=F64)
    for group in itertools.product(range(vocab), repeat=group_size):
        tokens = torch.tensor(group)
        theta = logits.clone().reshape(vocab, 1).requires_grad_()
        hidden = torch.ones(group_size, 1, dtype=F64)
        rewards = reward[tokens]
        inputs = objectives.ObjectiveInputs(
            policy=ModelOutputs(hidden, Head(theta)),
            tokens=tokens,
            rows=torch.arange(group_size),
            advantages=objectives.advantages(spec, rewards, None, group_size),
            rewards=rewards,
            group_pass_rate=objectives.group_pass_rate(objectives.passed(rewards), group_size),
            token_scale=objectives.token_scale(spec, [1] * group_size).double(),
            models={"reference": ModelOutputs(hidden, Head(logits.reshape(vocab, 1)))},
            groups=torch.zeros(group_size, dtype=torch.long),
            monitor_kl=False,
        )
        (grad,) = torch.autograd.grad(objectives.objective_loss(spec, inputs).loss, theta)
        total += probs[tokens].prod() * grad.reshape(-1)
    return total


def _closed_form(logits, reward, group_size, scale):
    """E[∇L] = −(1/G)·Σ_k C(G,k)p^k(1−p)^{G−k}·k(G−k)/(G(σ_k + 1e-6))·(1 + s_k·p/(1 − p))·g⁺,
    σ_k the unbiased std of k ones among G, g⁺ = E[∇log π(y) | pass] = Σ_{pass} π(y)(e_y − π)/p:
    since E[∇log π] = 0, the failures' mean score is −p/(1 − p)·g⁺, so scaling them by s_k keeps
    the step along g⁺ and changes only its length."""
    probs = logits.softmax(-1)
    passing = reward >= 1
    p = probs[passing].sum().item()
    g_plus = (probs[passing, None] * (torch.eye(len(probs), dtype=F64)[passing] - probs)).sum(0) / p
    g = group_size
    length = 0.0
    for k in range(1, g):
        sigma = math.sqrt(k * (g - k) / (g * (g - 1)))
        length += (
            math.comb(g, k)
            * p**k
            * (1 - p) ** (g - k)
            * k
            * (g - k)
            / (g * (sigma + 1e-6))
            * (1 + scale(k / g) * p / (1 - p))
        )
    return -length / g * g_plus


def test_lab_expected_step_is_grpos_direction_shortened_by_the_failures_scale():
    logits = torch.tensor([0.3, -0.2, 0.5], dtype=F64)
    reward = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    gui = _expected_gradient(_spec("gui-libra", 4), logits, reward, 4)
    grpo = _expected_gradient(_spec("grpo", 4, "kl_estimator=k3", "clip_high=0.2"), logits, reward, 4)
    expected_gui = _closed_form(logits, reward, 4, lambda mean: min(max(0.5 + 1.5 * mean, 0.0), 1.0))
    expected_grpo = _closed_form(logits, reward, 4, lambda mean: 1.0)
    torch.testing.assert_close(gui, expected_gui, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grpo, expected_grpo, rtol=1e-10, atol=1e-14)
    # same direction, shorter: only groups with one pass in four (s = 0.875) are scaled
    cosine = torch.nn.functional.cosine_similarity(gui, grpo, dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-12)
    assert 0 < gui.norm() < grpo.norm()
