import torch

from divrl.objectives import group_advantages
from divrl.surrogates import PolicyTokens, clipped


def clipped_policy_loss(logprobs, old_logprobs, advantages, clip_low, clip_high):
    no = torch.zeros_like(advantages)
    return clipped(PolicyTokens(logprobs, old_logprobs, advantages, no.bool(), no), clip_low, clip_high)


def test_group_advantages_of_a_known_reward_vector():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    adv = group_advantages(rewards, group_size=4)
    std = torch.tensor([1.0, 0, 0, 0]).std()  # unbiased std of the first group
    expected_first = (torch.tensor([1.0, 0, 0, 0]) - 0.25) / (std + 1e-6)
    torch.testing.assert_close(adv[:4], expected_first)
    assert torch.all(adv[4:] == 0)  # equal rewards: no signal
    mean_only = group_advantages(rewards, group_size=4, normalize=False)
    torch.testing.assert_close(mean_only[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_clipped_loss_clips_only_in_the_direction_of_the_advantage():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clipped_policy_loss(new, old, adv, clip_low=0.2, clip_high=0.28)
    # A>0, ρ=1.5 > 1.28 → clipped to 1.28; A<0, ρ=1.5 → min picks unclipped −1.5·(−1)... = 1.5
    torch.testing.assert_close(loss, torch.tensor([-1.28, 1.5, -0.5, 0.8]))
    assert clipped.tolist() == [True, False, False, True]


def test_on_policy_gradient_is_reinforce():
    logits = torch.randn(5, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[torch.tensor([0, 2])]
    adv = torch.tensor([1.0, -0.5])
    loss, _ = clipped_policy_loss(logp, logp.detach(), adv, 0.2, 0.28)
    (grad,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    (expected,) = torch.autograd.grad(-(adv * logp).sum(), logits)
    torch.testing.assert_close(grad, expected)


# ----- the composable objective ------------------------------------------------------------------
import math  # noqa: E402

import pytest  # noqa: E402

from divrl import objectives  # noqa: E402
from divrl.chunked import Head  # noqa: E402
from divrl.rowwise import ModelOutputs  # noqa: E402
from divrl.spec import parse_objective  # noqa: E402


def test_reward_penalty_is_centred_after_the_reward_is_normalized():
    """Equal task rewards: the advantage is −β(P − mean P), so β matters (it did not when the
    penalty was subtracted before the std division)."""
    rewards = torch.zeros(4)
    kl = torch.tensor([3.0, 1.0, 2.0, 5.0])
    spec = parse_objective({"advantage": "group_norm"})
    small = objectives.advantages(spec, rewards, 1e-4 * kl, group_size=4)
    large = objectives.advantages(spec, rewards, 1.0 * kl, group_size=4)
    torch.testing.assert_close(small, -1e-4 * (kl - kl.mean()))
    torch.testing.assert_close(large, -(kl - kl.mean()))
    # With varied rewards: normalized reward advantage minus the centred penalty.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    expected = group_advantages(rewards, 4) - 0.5 * (kl - kl.mean())
    torch.testing.assert_close(objectives.advantages(spec, rewards, 0.5 * kl, 4), expected)
    mean_only = parse_objective({"advantage": "mean_only"})  # = advantage of r − P
    torch.testing.assert_close(
        objectives.advantages(mean_only, rewards, kl, 4), group_advantages(rewards - kl, 4, normalize=False)
    )


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        ("token_mean", [1 / 6] * 6),
        ("seq_mean_token_mean", [1 / 4] * 2 + [1 / 8] * 4),
        ("seq_mean_token_sum", [1 / 2] * 6),
        ("seq_mean_token_sum_norm", [1 / 20] * 6),  # B = 2, C = 10
    ],
)
def test_token_scale_of_each_aggregation(aggregation, expected):
    spec = parse_objective({"loss_aggregation": aggregation, "loss_normalizer": 10})
    torch.testing.assert_close(objectives.token_scale(spec, [2, 4]), torch.tensor(expected))


def _inputs(old_logprobs=None, models=None):
    gen = torch.Generator().manual_seed(0)
    n, v, h = 5, 11, 3
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).requires_grad_()
    head = Head(torch.randn(v, h, generator=gen, dtype=torch.float64))
    ref = ModelOutputs(
        torch.randn(n, h, generator=gen, dtype=torch.float64),
        Head(torch.randn(v, h, generator=gen, dtype=torch.float64)),
    )
    return objectives.ObjectiveInputs(
        policy=ModelOutputs(hidden, head),
        tokens=torch.randint(0, v, (n,), generator=gen),
        rows=torch.tensor([0, 0, 1, 1, 1]),
        advantages=torch.tensor([1.0, -0.5], dtype=torch.float64),
        rewards=torch.tensor([1.0, 0.0]),
        group_pass_rate=torch.tensor([0.5, 0.5]),
        token_scale=torch.full((n,), 0.2, dtype=torch.float64),
        old_logprobs=old_logprobs,
        models={"reference": ref} if models is None else models,
    )


def test_sampled_estimator_in_the_loss_is_importance_weighted_by_the_detached_ratio():
    spec = parse_objective(
        {
            "policy_gradient": False,
            "terms": [{"divergence": "reverse_kl", "target": "reference", "estimator": "k2", "coef": 2.0}],
        }
    )
    on_policy = _inputs()
    lp = objectives._model_logprobs(on_policy.policy, on_policy.tokens)
    ref_lp = objectives._model_logprobs(on_policy.models["reference"], on_policy.tokens)
    old = lp - torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05], dtype=torch.float64)
    out = objectives.objective_loss(spec, _inputs(old_logprobs=old))
    k2 = 0.5 * (ref_lp - lp) ** 2
    ratio = torch.exp(lp - old)
    assert out.loss.item() == pytest.approx((2.0 * 0.2 * ratio * k2).sum().item(), rel=1e-12)
    assert out.token_sums["reverse_kl_to_reference"] == pytest.approx((ratio * k2).sum().item(), rel=1e-12)
    # the gradient is ρ·∇k2 (ρ not differentiated)
    inputs = _inputs(old_logprobs=old)
    (grad,) = torch.autograd.grad(objectives.objective_loss(spec, inputs).loss, inputs.policy.hidden)
    hidden = inputs.policy.hidden.detach().requires_grad_()
    lp_again = inputs.policy.head.logits(hidden).log_softmax(-1).gather(-1, inputs.tokens[:, None]).squeeze(-1)
    (expected,) = torch.autograd.grad((2.0 * 0.2 * ratio * 0.5 * (ref_lp - lp_again) ** 2).sum(), hidden)
    torch.testing.assert_close(grad, expected)


def test_masks_and_weights_apply_per_term_and_are_logged():
    spec = parse_objective(
        {
            "pg_mask": {"entropy_quantile": {"top": 0.4}},
            "terms": [
                {
                    "divergence": "forward_kl",
                    "target": "reference",
                    "coef": 0.5,
                    "weight": {"asymmetric": {"positive": 1.0, "negative": 0.0}},
                }
            ],
        }
    )
    inputs = _inputs()
    out = objectives.objective_loss(spec, inputs)
    assert out.token_sums["pg_masked_fraction"] == 3  # 2 of 5 tokens kept
    assert out.token_sums["forward_kl_to_reference_mean_weight"] == 2  # only completion 0 (A > 0)
    _lp, entropy = (
        t.detach() for t in objectives.chunked.logprob_entropy(inputs.policy.hidden, inputs.policy.head, inputs.tokens)
    )
    keep = (entropy >= entropy.topk(2).values[-1]).double()
    adv = inputs.advantages[inputs.rows]
    ref = inputs.models["reference"]
    fkl = objectives.chunked.divergence(
        "forward_kl", inputs.policy.hidden.detach(), inputs.policy.head, ref.hidden, ref.head
    )
    expected_pg = (0.2 * keep * -adv).sum()  # ratio 1 on-policy
    expected_kl = 0.5 * (0.2 * torch.tensor([1.0, 1, 0, 0, 0], dtype=torch.float64) * fkl).sum()
    assert out.loss_parts["pg"] == pytest.approx(expected_pg.item(), rel=1e-10)
    assert out.loss_parts["forward_kl_to_reference"] == pytest.approx(expected_kl.item(), rel=1e-10)
    metrics = objectives.summarize([(out.token_sums, out.loss_parts, 5)])
    assert metrics["pg_masked_fraction"] == pytest.approx(0.6)
    assert metrics["pg_loss"] == out.loss_parts["pg"]
    total = abs(out.loss_parts["pg"]) + abs(out.loss_parts["forward_kl_to_reference"])
    assert metrics["forward_kl_to_reference_share"] == pytest.approx(
        abs(out.loss_parts["forward_kl_to_reference"]) / total
    )
    assert metrics["loss"] == pytest.approx(out.loss.item())
    assert metrics["kl"] == metrics["reverse_kl_to_reference"] >= 0  # monitored, not in the loss
    assert not math.isnan(metrics["entropy"])


def test_kl_metric_is_the_unmasked_mean_kl_when_the_kl_term_is_masked():
    inputs = _inputs()
    ref = inputs.models["reference"]
    exact = objectives.chunked.divergence(
        "reverse_kl", inputs.policy.hidden.detach(), inputs.policy.head, ref.hidden, ref.head
    )
    term = {"divergence": "reverse_kl", "target": "reference", "coef": 0.001, "mask": "failed"}
    out = objectives.objective_loss(parse_objective({"terms": [term]}), inputs)
    metrics = objectives.summarize([(out.token_sums, out.loss_parts, 5)])
    assert metrics["kl"] == pytest.approx(float(exact.mean()), rel=1e-10)  # every token
    assert metrics["reverse_kl_to_reference"] == pytest.approx(float(exact[2:].sum() / 5), rel=1e-10)  # failed only


def test_summarize_keeps_the_online_metrics_and_names_the_stored_ones():
    online = ({"entropy": 2.0 * 100, "clip_fraction": 3.0}, {"pg": 0.5}, 100)
    stored = (
        {"entropy": 0.5 * 40, "forward_kl_to_reference_stored": 4.0},
        {"forward_kl_to_reference_stored": 0.01},
        40,
    )
    metrics = objectives.summarize([online, stored])
    assert (metrics["entropy"], metrics["entropy_stored"]) == (2.0, 0.5)
    assert (metrics["clip_fraction"], metrics["forward_kl_to_reference_stored"]) == (0.03, 0.1)


def test_the_stored_objective_is_its_terms_alone():
    spec = parse_objective(
        {
            "td_regularizer": {"coef": 0.5, "gamma": 0.9},
            "entropy_anchor": {},
            "terms": [{"divergence": "forward_kl", "target": "reference", "estimator": "stored", "coef": 0.01}],
        }
    )
    online, stored = objectives.online_and_stored(spec)
    assert online.td_regularizer == spec.td_regularizer and online.terms == ()
    assert stored is not None and (stored.td_regularizer, stored.entropy_anchor, stored.policy_gradient) == (
        None,
        None,
        False,
    )
    inputs = _inputs(models={})
    inputs.stored_logprobs = torch.full((5,), math.log(0.1), dtype=torch.float64)
    assert set(objectives.objective_loss(stored, inputs).loss_parts) == {"forward_kl_to_reference_stored"}
