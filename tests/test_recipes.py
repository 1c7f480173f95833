"""Recipes: each formula on hand-computed numbers (a few tokens, a 5-word vocabulary), the lab
behaviour the paper claims where one exists, and a one-step `divrl train --recipe NAME` smoke run
on the tiny model."""

import dataclasses
import math

import pytest
import torch

from cli_args import TINY_RUN
from divrl import lab, objectives, recipes
from divrl.chunked import Head
from divrl.cli import main
from divrl.config import build_config
from divrl.rowwise import ModelOutputs

V, H = 5, 3
TOKENS = torch.tensor([0, 3, 1, 4, 4, 2, 0, 1])  # completions of lengths 2, 1, 3, 2 (2 groups of 2)
LENGTHS = [2, 1, 3, 2]
ROWS = torch.repeat_interleave(torch.arange(4), torch.tensor(LENGTHS))


def _spec(recipe, *overrides):
    return build_config(None, ["group_size=2", "max_new_tokens=4", "teacher=tiny", *overrides], recipe=recipe).objective


def _toy(spec, rewards):
    """On-policy inputs of the toy batch, float64; returns the inputs and log p(y_t)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(len(TOKENS), H, dtype=torch.float64, generator=gen).requires_grad_()
    head = Head(torch.randn(V, H, dtype=torch.float64, generator=gen))
    rewards = torch.tensor(rewards, dtype=torch.float64)
    reference = ModelOutputs(
        torch.randn(len(TOKENS), H, dtype=torch.float64, generator=gen),
        Head(torch.randn(V, H, dtype=torch.float64, generator=gen)),
    )
    inputs = objectives.ObjectiveInputs(
        policy=ModelOutputs(hidden, head),
        tokens=TOKENS,
        rows=ROWS,
        advantages=objectives.advantages(spec, rewards, None, group_size=2),
        rewards=rewards,
        group_pass_rate=objectives.group_pass_rate(objectives.passed(rewards), 2),
        token_scale=objectives.token_scale(spec, LENGTHS).double(),
        models={"reference": reference},
    )
    logp = head.logits(hidden).log_softmax(-1).gather(-1, TOKENS[:, None]).squeeze(-1)
    return inputs, logp


def _check_policy_gradient(spec, rewards, coefficient):
    """On-policy the PG loss is Σ_t coefficient_t·(−log p(y_t)) in value of its gradient; check both
    the gradient and the pg part's value (ratio 1: value = −Σ coefficient_t)."""
    inputs, logp = _toy(spec, rewards)
    out = objectives.objective_loss(spec, inputs)
    assert out.loss_parts["pg"] == pytest.approx(-coefficient.sum().item(), rel=1e-12, abs=1e-15)
    (got,) = torch.autograd.grad(out.loss_parts and objectives.objective_loss(spec, inputs).loss, inputs.policy.hidden)
    (expected,) = torch.autograd.grad(-(coefficient * logp).sum(), inputs.policy.hidden)
    torch.testing.assert_close(got, expected)
    return out


def test_dr_grpo_is_mean_centred_token_sums_over_a_constant():
    spec = _spec("dr-grpo")
    assert (spec.advantage, spec.aggregation, spec.normalizer, spec.terms) == (
        "mean_only",
        "seq_mean_token_sum_norm",
        4.0,
        (),
    )
    # rewards (1, 0 | 0.5, 0.5): A = (0.5, −0.5 | 0, 0); a_t = 1/(B·C) = 1/16
    coefficient = torch.tensor([0.5, 0.5, -0.5, 0, 0, 0, 0, 0], dtype=torch.float64) / 16
    _check_policy_gradient(spec, [1.0, 0.0, 0.5, 0.5], coefficient)


@pytest.mark.parametrize(
    "recipe, positive, negative", [("psr", 1.0, 0.0), ("nsr", 0.0, 1.0), ("w-reinforce", 0.1, 1.0)]
)
def test_psr_nsr_w_reinforce_give_lambda_to_correct_and_minus_one_to_incorrect(recipe, positive, negative):
    spec = _spec(recipe)
    # rewards (1, 0 | 0.5, 1): partial credit 0.5 does not pass → A = (+1, −1 | −1, +1), no baseline
    per_sample = torch.tensor([positive, -negative, -negative, positive], dtype=torch.float64)
    coefficient = per_sample[ROWS] / len(TOKENS)  # token mean over the batch, as the official code
    out = _check_policy_gradient(spec, [1.0, 0.0, 0.5, 1.0], coefficient)
    assert out.token_sums["pg_mean_weight"] == pytest.approx(
        sum(({1.0: positive, 0.0: negative}[s > 0]) * n for s, n in zip([1, -1, -1, 1], LENGTHS))
    )


def test_paced_weights_each_prompt_by_its_pass_rate_kernel():
    spec = _spec("paced")
    # group 1 (1, 0): p̂ = 0.5 → w = 0.25; group 2 (1, 1): p̂ = 1 → w = 0 (no signal, no loss)
    rewards = [1.0, 0.0, 1.0, 1.0]
    adv = objectives.group_advantages(torch.tensor(rewards, dtype=torch.float64), 2)
    coefficient = (torch.tensor([0.25, 0.25, 0.0, 0.0], dtype=torch.float64) * adv)[ROWS] / len(TOKENS)
    inputs, _ = _toy(spec, rewards)
    out = objectives.objective_loss(spec, inputs)
    assert out.loss_parts["pg"] == pytest.approx(-coefficient.sum().item(), rel=1e-12)
    assert out.token_sums["pg_mean_weight"] == pytest.approx(0.25 * 3)
    assert "reverse_kl_to_reference" in out.loss_parts  # GRPO's reference penalty stays


def test_entropy_gate_trains_only_the_highest_entropy_fifth_of_the_tokens():
    spec = _spec("entropy-gate")
    rewards = [1.0, 0.0, 0.0, 1.0]
    inputs, _ = _toy(spec, rewards)
    entropy = objectives.chunked.logprob_entropy(inputs.policy.hidden, inputs.policy.head, TOKENS)[1].detach()
    keep = torch.zeros(len(TOKENS), dtype=torch.float64)
    keep[entropy.topk(2).indices] = 1.0  # ⌈0.2 · 8⌉ = 2 tokens
    coefficient = keep * inputs.advantages[ROWS] / len(TOKENS)
    out = _check_policy_gradient(spec, rewards, coefficient)
    assert out.token_sums["pg_masked_fraction"] == 6


def test_psr_nsr_and_w_reinforce_share_one_expected_gradient_in_the_lab():
    """E[1_correct ∇log p] = −E[1_incorrect ∇log p] (since E[∇log p] = 0): in expectation PSR and
    NSR take the same step and W-REINFORCE (1 + λ) times it; they differ only through which
    answers a finite group samples. One exact step of the trainer's objective from one table."""
    init = torch.tensor([[0.3, 0.02, 0.38, 0.2, 0.1], [0.1, 0.5, 0.1, 0.1, 0.2]], dtype=torch.float64).log()
    reward = torch.tensor([[1.0, 1.0, 0, 0, 0], [0, 0, 0, 1.0, 0]], dtype=torch.float64)
    step = {
        name: lab.objective_fixed_point(_spec(name), reward, {}, init=init, steps=1, lr=1.0) - init
        for name in ("psr", "nsr", "w-reinforce")
    }
    step = {k: v - v.mean(-1, keepdim=True) for k, v in step.items()}  # log-probs: up to a constant
    assert step["psr"].abs().max() > 1e-3
    torch.testing.assert_close(step["nsr"], step["psr"], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(step["w-reinforce"], 1.1 * step["psr"], rtol=1e-3, atol=1e-6)


def test_sampled_groups_average_to_the_expected_step():
    """The trainer's pipeline on finite groups (sample, score, advantages, token mean,
    objective_loss) is unbiased for W-REINFORCE's expected update (no baseline)."""
    init = torch.tensor([[0.3, 0.1, 0.4, 0.2]], dtype=torch.float64).log()
    reward = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    spec = _spec("w-reinforce")
    lr, n = 1e-3, 1500
    gen = torch.Generator().manual_seed(0)
    steps = torch.stack(
        [
            lab.objective_sampled_steps(spec, reward, {}, init=init, steps=1, group_size=4, lr=lr, generator=gen) - init
            for _ in range(n)
        ]
    )
    steps = steps - steps.mean(-1, keepdim=True)
    expected = lab.objective_fixed_point(spec, reward, {}, init=init, steps=1, lr=lr) - init
    expected = expected - expected.mean(-1, keepdim=True)
    mean, stderr = steps.mean(0), steps.std(0) / n**0.5
    assert ((mean - expected).abs() < 4 * stderr + 1e-9).all(), (mean, expected, stderr)


def test_every_recipe_parses_and_documents_its_paper():
    for name in recipes.names():
        recipe = recipes.load(name)
        assert recipe.description and "20" in recipe.paper, name  # a year in the citation
        build_config(None, [] if "stage1" in recipe.config else ["teacher=tiny"], recipe=name)


# Offline recipes need prompts whose stored responses both pass and fail: the untrained tiny model
# solves nothing, so a JSONL task's responses are scored by the parity of their length.
OFFLINE_ARGS = ["stored_prompts=4", "stored_samples=4", "offline_keep=2"]
PREFERENCE_ARGS = ["preference.prompts=4", "preference.samples=4", "preference.pairs_per_step=2"]


@pytest.mark.parametrize("name", recipes.names())
def test_divrl_train_recipe_smoke_run_on_the_tiny_model(tmp_path, name, say_task):
    overrides = [
        *TINY_RUN,
        "teacher=tiny",
        "steps=1",
        "prompts_per_step=2",
        f"output_dir={tmp_path / 'run'}",
    ]
    config = recipes.load(name).config
    if config.get("stage1"):  # a two-stage recipe: a CPU-sized first stage
        overrides += [
            "teacher=null",
            *(
                f"stage1.{o}"
                for o in ("steps=1", "checkpoint_every=1", "prompts_per_step=2", "stored_prompts=4", "stored_samples=4")
            ),
        ]
    if config.get("offline") or (config.get("stage1") or {}).get("offline"):
        overrides += [*OFFLINE_ARGS, *say_task(range(24), "parity")]
    if config.get("preference"):  # pairs need passing and failing samples, as offline sets do
        overrides += [*PREFERENCE_ARGS, *say_task(range(24), "parity")]
        overrides += ["preference.round_steps=1"] if config["preference"].get("round_steps") else []
    args = ["train", "--recipe", name, *(a for o in overrides for a in ("--set", o))]
    assert main(args) == 0
    assert (tmp_path / "run" / "checkpoints" / "step-1").is_dir()


def test_nft_on_policy_gradient_equals_dr_grpo():
    """At πθ = πold NFT's per-token gradient weights are −(1 − r̂) on passes and +r̂ on failures:
    REINFORCE with the group-mean baseline on 0/1 rewards, Dr. GRPO's gradient (same aggregation)."""
    rewards = [1.0, 0.0, 0.0, 1.0]  # r̂ = 0.5 in both groups
    nft, dr = _spec("nft"), _spec("dr-grpo")
    assert nft.aggregation == dr.aggregation and nft.pg_loss == "nft"
    grads = []
    for spec in (nft, dr):
        inputs, _ = _toy(spec, rewards)
        (grad,) = torch.autograd.grad(objectives.objective_loss(spec, inputs).loss, inputs.policy.hidden)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1])
    # with r̂ = 0.25: pass weight −0.75, fail weight +0.25 per token (hand-computed)
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    lengths, tokens = [1] * 8, torch.arange(8) % V
    spec = build_config(None, ["group_size=4", "max_new_tokens=4"], recipe="nft").objective
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(8, H, dtype=torch.float64, generator=gen).requires_grad_()
    head = Head(torch.randn(V, H, dtype=torch.float64, generator=gen))
    r = torch.tensor(rewards, dtype=torch.float64)
    inputs = objectives.ObjectiveInputs(
        policy=ModelOutputs(hidden, head),
        tokens=tokens,
        rows=torch.arange(8),
        advantages=torch.zeros(8),
        rewards=r,
        group_pass_rate=objectives.group_pass_rate(objectives.passed(r), 4),
        token_scale=objectives.token_scale(spec, lengths).double(),
    )
    (got,) = torch.autograd.grad(objectives.objective_loss(spec, inputs).loss, hidden)
    logp = head.logits(hidden).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    weight = torch.where(r == 1, -0.75, 0.25) / (8 * 4)
    (expected,) = torch.autograd.grad((weight * logp).sum(), hidden)
    torch.testing.assert_close(got, expected)


def test_nft_off_policy_clamps_the_implicit_negative_straight_through():
    from divrl.surrogates import PolicyTokens, nft

    logp = torch.log(torch.tensor([0.6, 0.3], dtype=torch.float64)).requires_grad_()
    old = torch.log(torch.tensor([0.3, 0.3], dtype=torch.float64))  # ρ = (2, 1)
    tokens = PolicyTokens(logp, old, torch.zeros(2), torch.tensor([False, False]), torch.full((2,), 0.25))
    loss, clamped = nft(tokens, epsilon=1.0)
    # ρ = 2: (1 − 0.25·2)/0.75 = 2/3 < ε → value log 1 = 0, gradient of log(2/3-branch) kept
    assert loss[0].item() == 0.0 and clamped.tolist() == [True, False]
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    # d/dlogρ of −0.75·log(x), x = (1 − 0.25ρ)/0.75, through the straight-through value 1:
    # −0.75 · (1/1) · dx/dlogρ = −0.75 · (−0.25·2/0.75) = 0.5
    assert grad[0].item() == pytest.approx(0.5)
    assert grad[1].item() == pytest.approx(0.25)  # ρ = 1: +r̂


def test_lp_reg_pulls_only_the_rare_kept_negative_tokens_toward_the_filtered_proxy():
    """One context, 5 tokens with p = (0.6, 0.3, 0.088, 0.011, 0.001); κ = 0.02 relative drops
    tokens 3, 4 (p < 0.012); Z = 0.988. Completions (one token each): y = 0 (+), 2 (−), 4 (−),
    1 (−). Lowest-probability half of the 3 negative tokens: tokens 4 and 2; token 4 is filtered,
    so only the completion with y = 2 gets the k3 term: k3 = 1/Z − 1 + log Z, gradient
    (1 − 1/Z)∇log p(2)."""
    probs = torch.tensor([0.6, 0.3, 0.088, 0.011, 0.001], dtype=torch.float64)
    theta = probs.log()[None].clone().requires_grad_()
    tokens = torch.tensor([0, 2, 4, 1])
    spec = build_config(
        None, ["group_size=4", "terms[0].mask.low_probability_negatives.fraction=0.5"], recipe="lp-reg"
    ).objective
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    inputs = objectives.ObjectiveInputs(
        policy=ModelOutputs(torch.ones(4, 1, dtype=torch.float64), Head(theta.T)),
        tokens=tokens,
        rows=torch.arange(4),
        advantages=objectives.advantages(spec, rewards, None, 4),
        rewards=rewards,
        group_pass_rate=torch.full((4,), 0.25, dtype=torch.float64),
        token_scale=torch.full((4,), 0.25, dtype=torch.float64),
    )
    out = objectives.objective_loss(spec, inputs)
    z = probs[:3].sum()
    term = "reverse_kl_to_filter"
    assert out.token_sums[f"{term}_masked_fraction"] == 3
    assert out.loss_parts[term] == pytest.approx((0.25 * (1 / z - 1 + z.log())).item(), rel=1e-9)
    (grad,) = torch.autograd.grad(out.loss, theta)
    pg = -(0.25 * inputs.advantages * theta.log_softmax(-1)[0, tokens]).sum()
    lp = 0.25 * (1 - 1 / z) * theta.log_softmax(-1)[0, 2]
    (expected,) = torch.autograd.grad(pg + lp, theta)
    torch.testing.assert_close(grad, expected)


def test_sequence_chi2_is_unbiased_for_the_chi2_between_completions():
    """Two-token completions from a table policy: E_πθ[w − 1] = χ²(πθ‖q) over all V² sequences,
    and E_πθ[2(w − 1)∇log πθ(y)] = ∇χ², computed exactly by enumeration through sequence_chi2."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(2, 3, dtype=torch.float64, generator=gen).requires_grad_()  # position × token
    q = torch.randn(2, 3, dtype=torch.float64, generator=gen).log_softmax(-1)
    seqs = torch.cartesian_prod(torch.arange(3), torch.arange(3))  # 9 completions of 2 tokens
    logp = theta.log_softmax(-1)
    tokens_lp = torch.stack([logp[0, seqs[:, 0]], logp[1, seqs[:, 1]]], 1).reshape(-1)
    tokens_lq = torch.stack([q[0, seqs[:, 0]], q[1, seqs[:, 1]]], 1).reshape(-1)
    rows = torch.arange(9).repeat_interleave(2)
    per_token = objectives.sequence_chi2(tokens_lp, tokens_lq, rows, 9)
    seq_prob = tokens_lp.detach().view(9, 2).sum(1).exp()
    expected_value = (seq_prob * (per_token.detach().view(9, 2)[:, 0])).sum()
    joint_p, joint_q = tokens_lp.view(9, 2).sum(1), tokens_lq.view(9, 2).sum(1)
    chi2 = (joint_p.exp() ** 2 / joint_q.exp()).sum() - 1
    assert expected_value.item() == pytest.approx(chi2.item(), rel=1e-10)
    (grad,) = torch.autograd.grad((seq_prob[rows] * per_token).sum(), theta, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(chi2, theta)
    torch.testing.assert_close(grad, expected_grad)


def test_chi2_recipe_and_its_sequence_form_are_valid_and_bounded_to_chi2():
    spec = _spec("chi2")
    assert [t.name for t in spec.terms] == ["chi2_to_reference", "chi2_to_reference_sequence"]
    with pytest.raises(Exception, match="the sequence estimator is the χ² of whole completions"):
        build_config(None, ["terms=[{divergence: forward_kl, target: reference, estimator: sequence}]"])
    with pytest.raises(Exception, match="'inner_iterations' must be 1 with the sequence estimator"):
        build_config(None, ["inner_iterations=2"], recipe="chi2")


def test_reasonmaxxer_is_gated_cross_entropy_plus_forward_kl_elsewhere_each_a_mean_over_its_positions():
    probe = _spec("reasonmaxxer")
    inputs, logp = _toy(probe, [1.0, 0.0, 1.0, 1.0])
    reference = inputs.models["reference"]
    ref_logits = reference.head.logits(reference.hidden).log_softmax(-1)
    ref_entropy = -(ref_logits.exp() * ref_logits).sum(-1)
    middle = ref_entropy.sort().values[3:5].detach()
    tau = float(middle.mean())  # halfway between the 4th and 5th entropies: 4 positions above τ
    spec = _spec(
        "reasonmaxxer",
        f"pg_mask={{reference_entropy_above: {{threshold: {tau}}}}}",
        f"terms[0].mask={{reference_entropy_at_most: {{threshold: {tau}}}}}",
    )
    gate = ref_entropy > tau
    assert int(gate.sum()) == 4
    # rewards (1, 0 | 1, 1), population std: A = (+1, −1 | 0, 0); no clip at |A| = 1
    advantage = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)[ROWS]
    policy_logits = inputs.policy.head.logits(inputs.policy.hidden).log_softmax(-1)
    forward_kl = (ref_logits.exp() * (ref_logits - policy_logits)).sum(-1)
    expected = (-advantage * logp)[gate].mean() + 0.2 * forward_kl[~gate].mean()
    out = objectives.objective_loss(spec, inputs)
    assert out.loss_parts["pg"] == pytest.approx((-advantage * logp)[gate].mean().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)  # the fused tiles run in fp32
    (got,) = torch.autograd.grad(out.loss, inputs.policy.hidden)
    (want,) = torch.autograd.grad(expected, inputs.policy.hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert out.token_sums["pg_masked_fraction"] == int((~gate).sum())
    assert out.token_sums["forward_kl_to_reference_masked_fraction"] == int(gate.sum())

    # The prompt's positions join the KL's mean, once per completion of their prompt (2 per group).
    gen = torch.Generator().manual_seed(5)
    prompt_hidden = torch.randn(3, H, dtype=torch.float64, generator=gen).requires_grad_()
    ref_prompt = ModelOutputs(torch.randn(3, H, dtype=torch.float64, generator=gen), reference.head)
    with_prompt = dataclasses.replace(
        inputs,
        prompt=objectives.PromptPositions(
            ModelOutputs(prompt_hidden, inputs.policy.head),
            {"reference": ref_prompt},
            torch.tensor([2, 2, 2]),
            float(inputs.token_scale.mean()),  # the toy's micro-batch is its whole batch
        ),
    )
    prompt_ref = reference.head.logits(ref_prompt.hidden).log_softmax(-1)
    prompt_policy = inputs.policy.head.logits(prompt_hidden).log_softmax(-1)
    prompt_kl = (prompt_ref.exp() * (prompt_ref - prompt_policy)).sum(-1)
    kl_mean = (forward_kl[~gate].sum() + 2 * prompt_kl.sum()) / (int((~gate).sum()) + 6)
    out = objectives.objective_loss(spec, with_prompt)
    assert out.loss_parts["forward_kl_to_reference"] == pytest.approx(0.2 * kl_mean.item(), rel=1e-5)
    (got,) = torch.autograd.grad(out.loss, prompt_hidden)
    (want,) = torch.autograd.grad(0.2 * kl_mean, prompt_hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_reasonmaxxer_advantage_is_a_population_z_score_clipped_at_2_5():
    spec = _spec("reasonmaxxer")
    rewards = torch.tensor([1.0] + [0.0] * 9 + [1.0] * 5 + [0.0] * 5)  # groups of 10: 1 pass; 5 passes
    adv = objectives.advantages(spec, rewards, None, group_size=10)
    # one pass in ten: z = 0.9/√(0.1·0.9) = 3 → clipped to 2.5; the others −0.1/0.3 = −1/3
    torch.testing.assert_close(adv[:10], torch.tensor([2.5] + [-1 / 3] * 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv[10:], torch.tensor([1.0] * 5 + [-1.0] * 5), atol=1e-5, rtol=0)


def test_ace_scales_only_negative_advantages_by_one_plus_alpha_softplus_of_the_confidence_shift():
    spec = _spec("ace", "pg_weight={confidence_shift: {alpha: 0.5}}")
    rewards = [1.0, 0.0, 0.0, 1.0]
    inputs, logp = _toy(spec, rewards)
    ref = inputs.models["reference"]
    ref_logp = ref.head.logits(ref.hidden).log_softmax(-1).gather(-1, TOKENS[:, None]).squeeze(-1)
    shift = torch.zeros(4, dtype=torch.float64).index_add(0, ROWS, (logp - ref_logp).detach())
    shift = shift / torch.tensor(LENGTHS, dtype=torch.float64)  # mean over the completion's tokens
    adv = inputs.advantages
    scale = torch.where(adv < 0, 1 + 0.5 * torch.nn.functional.softplus(shift), 1.0)
    coefficient = (scale * adv)[ROWS] / len(TOKENS)
    out = _check_policy_gradient(spec, rewards, coefficient)
    assert out.token_sums["pg_mean_weight"] == pytest.approx(float((scale[ROWS]).sum()))
    # softplus(0) = log 2; the scale grows with the confidence shift (dÃ/dc < 0 for A < 0)
    from divrl import weights

    stats = weights.TokenStats(
        rows=torch.tensor([0, 1]),
        advantages=torch.tensor([-1.0, -1.0]),
        rewards=torch.zeros(2),
        group_pass_rate=torch.zeros(2),
        old_logprobs=torch.tensor([-1.0, -0.5]),
        ref_logprobs=torch.tensor([-1.0, -1.0]),
    )
    got = weights.compute([("confidence_shift", {"alpha": 2.0})], stats)
    torch.testing.assert_close(got, torch.tensor([1 + 2 * math.log(2), 1 + 2 * math.log1p(math.exp(0.5))]))
    summed = weights.compute([("confidence_shift", {"alpha": 2.0, "length_normalized": False})], stats)
    torch.testing.assert_close(summed, got)  # one token each: mean = sum


def test_rapo_penalizes_the_forward_kl_to_the_reward_tempered_reference():
    spec = _spec("rapo")
    rewards = [1.0, 0.0, 0.0, 1.0]
    inputs, _ = _toy(spec, rewards)
    out = objectives.objective_loss(spec, inputs)
    ref = inputs.models["reference"]
    ref_logp = ref.head.logits(ref.hidden).log_softmax(-1)
    exponent = torch.tensor([1.0, 0.5, 0.5, 1.0], dtype=torch.float64)[ROWS, None]  # φ(1) = 1, φ(0) = ½
    q = (exponent * ref_logp).log_softmax(-1)
    logp = inputs.policy.head.logits(inputs.policy.hidden).log_softmax(-1)
    forward_kl = (q.exp() * (q - logp)).sum(-1)
    expected = 0.001 * forward_kl.sum() / len(TOKENS)  # token mean
    name = "forward_kl_to_reward_power"
    assert out.loss_parts[name] == pytest.approx(expected.item(), rel=1e-9)
    assert out.token_sums[name] == pytest.approx(forward_kl.sum().item(), rel=1e-9)


def test_rapo_fixed_point_is_the_forward_kl_optimum_toward_its_reward_weighted_reference_mixture():
    """In the lab each (context, token) is a completion: its prefix is pulled toward q̃_r(y), so the
    term's expected gradient is that of KL(m‖πθ), m = P(pass)·π_ref + P(fail)·π_ref^φ₀/Z; the fixed
    point is C3's hyperbolic tilt toward m (self-consistently)."""
    ref, _ = lab.random_problem(5, (2,), seed=3)
    reward = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    beta = 0.5
    spec = _spec("rapo", "advantage=mean_only", f"terms[0].coef={beta}")
    got = lab.objective_fixed_point(spec, reward, {"reference": ref}, steps=3000, lr=3.0).exp()
    p_pass = (got * reward).sum(-1, keepdim=True)
    mixture = p_pass * ref.exp() + (1 - p_pass) * (0.5 * ref).log_softmax(-1).exp()
    expected = lab.forward_kl_optimum(mixture.log(), reward, beta).exp()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    reverse = lab.tilted(ref, reward, beta).exp()  # the reverse-KL optimum differs
    assert (got - reverse).abs().max() > 1e-2
