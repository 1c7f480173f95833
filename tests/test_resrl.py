"""ResRL (recipe `resrl`, weight `resrl`): the residual weight on hand-computed hidden states, its
edge cases, λ = 1 and w ≡ 1 recovering GRPO, the logged mean weight of failed tokens, the recipe.

Hidden states are built in H = 4 from u = (1, 1, −1, −1), v = (1, −1, 1, −1), z = (1, −1, −1, 1):
each has mean 0 and unit (population) variance, so LN(cos θ·u + sin θ·v) = s·(cos θ·u + sin θ·v),
s = 1/√(1 + 1e-5) (LN's eps). Positives ±u give μ = 0 and V_1 = u/2; a failing token at angle θ
then has residual s·sin θ·v and d = s²·‖v‖²·sin²θ/H = s²·sin²θ. The quantiles and weights below
are ratios of d, in which s² cancels.
"""

import dataclasses
import math

import pytest
import torch

from divrl import objectives
from divrl import weights as W
from divrl.chunked import Head
from divrl.config import build_config
from divrl.rowwise import ModelOutputs

F64 = torch.float64
U = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=F64)
V = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)
Z = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)


def at(sin2: float) -> torch.Tensor:
    """cos θ·u + sin θ·v with sin²θ = sin2: d = s²·sin2 off the line of u."""
    return math.sqrt(1.0 - sin2) * U + math.sqrt(sin2) * V


# One group: completions 0, 1 pass (tokens u, −u each), 2 and 3 fail (3 + 2 tokens, sin²θ = 0, ¼,
# ½, ¾, 1). Raw states are shifted, h + b (LN removes b; a scale a would change s through eps).
HIDDEN = torch.stack([U, -U, U, -U, at(0.0), at(0.25), at(0.5), at(0.75), at(1.0)])
HIDDEN = HIDDEN + torch.tensor([0.0, 2.0, -0.5, 3.0, 7.0, 1.0, 0.2, -4.0, 10.0], dtype=F64)[:, None]
ROWS = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3])
PASSED = torch.tensor([True, True, False, False])
# d/s² = 0, ¼, ½, ¾, 1; quantiles (linear, positions 0.8 and 3.2 of 0..4): lo = 0.2, hi = 0.8;
# w = 0.1 + 0.9·clip((d − 0.2)/0.6, 0, 1): 0.1, 0.1 + 0.9/12, 0.55, 0.1 + 0.9·11/12, 1.
EXPECTED_FAILED = [0.1, 0.175, 0.55, 0.925, 1.0]


def stats(hidden=HIDDEN, rows=ROWS, passed=PASSED, groups=None) -> W.TokenStats:
    b = len(passed)
    rewards = passed.to(F64)
    return W.TokenStats(
        rows=rows,
        advantages=rewards - 0.5,
        rewards=rewards,
        group_pass_rate=torch.full((b,), 0.5, dtype=F64),
        passed=passed,
        groups=torch.zeros(b, dtype=torch.long) if groups is None else groups,
        hidden=hidden,
    )


def resrl(s: W.TokenStats, **params) -> torch.Tensor:
    return W.compute([("resrl", {"rank": 1, **params})], s)


def test_hand_computed_weights_of_a_negative_on_the_line_off_it_and_between():
    got = resrl(stats())
    expected = torch.tensor([0.1] * 4 + EXPECTED_FAILED, dtype=F64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_negative_on_the_positive_line_through_mu_gets_w_min_and_an_orthogonal_one_gets_1():
    # the failed tokens −u (on the line, other side of μ = 0) and z (orthogonal): w_min, 1
    hidden = torch.cat([HIDDEN, torch.stack([-U, Z + 3])])
    rows = torch.cat([ROWS, torch.tensor([3, 3])])
    got = resrl(stats(hidden, rows), min_weight=0.2)
    assert got[-2] == pytest.approx(0.2) and got[-1] == pytest.approx(1.0)
    assert got[4] == pytest.approx(0.2)  # u itself


def test_rank_stops_at_the_positives_numerical_rank():
    # rank 64 > M − 1 = 3, but the positives ±u span one line: k = 1, the hand-computed weights
    got = W.compute([("resrl", {})], stats())
    torch.testing.assert_close(got, torch.tensor([0.1] * 4 + EXPECTED_FAILED, dtype=F64), rtol=1e-9, atol=1e-12)


def test_repeated_positive_tokens_give_weights_independent_of_the_svds_rounding():
    # 12 positive tokens repeating 4 states (a group's first tokens share the prompt's last state):
    # the singular vectors past rank 3 are arbitrary, so float32 and float64 SVDs must not use them
    torch.manual_seed(0)
    states = torch.randn(4, 16, dtype=F64)
    hidden = torch.cat([states.repeat(3, 1), torch.randn(10, 16, dtype=F64)])
    rows = torch.tensor([0] * 6 + [1] * 6 + [2] * 5 + [3] * 5)
    in_double = W.compute([("resrl", {})], stats(hidden, rows))
    in_float = W.compute([("resrl", {})], stats(hidden.float(), rows))
    torch.testing.assert_close(in_float, in_double, rtol=0, atol=1e-4)
    assert in_double[12:].std() > 0.1  # the weights vary: the comparison is not of constants


def test_groups_without_a_pass_or_with_few_passing_tokens_keep_1_on_failures():
    # group 0 as above; group 1: two failures, no pass; group 2: a pass of 3 tokens (< 4) + a failure
    hidden = torch.cat([HIDDEN, torch.stack([U, V, U, -U, U, V])])
    rows = torch.cat([ROWS, torch.tensor([4, 5, 6, 6, 6, 7])])
    passed = torch.cat([PASSED, torch.tensor([False, False, True, False])])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    got = resrl(stats(hidden, rows, passed, groups))
    torch.testing.assert_close(
        got, torch.tensor([0.1] * 4 + EXPECTED_FAILED + [1.0, 1.0, 0.1, 0.1, 0.1, 1.0], dtype=F64)
    )


def test_all_passing_group_gets_lambda_and_equal_residuals_get_the_midpoint():
    passed = torch.tensor([True, True])
    got = resrl(stats(HIDDEN[:4], ROWS[:4], passed), positive=0.3)
    assert got.tolist() == pytest.approx([0.3] * 4)
    # every failure at the same residual: hi − lo = 0 < 1e-5 → (w_min + 1)/2
    hidden = torch.cat([HIDDEN[:4], torch.stack([at(0.5), at(0.5) - 1, -at(0.5)])])
    rows = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    got = resrl(stats(hidden, rows))
    assert got[4:].tolist() == pytest.approx([0.55] * 3)


def test_the_positive_token_cap_draws_a_deterministic_subset():
    # six positive tokens ±u capped at 4: any subset keeps the line of u (μ moves along it), so the
    # failures' weights are unchanged; the draw is seeded, so two calls agree
    hidden = torch.cat([torch.stack([U, -U, U, -U, U, -U]), HIDDEN[4:]])
    rows = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
    first = resrl(stats(hidden, rows), max_positive_tokens=4)
    torch.testing.assert_close(first, torch.tensor([0.1] * 6 + EXPECTED_FAILED, dtype=F64), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(resrl(stats(hidden, rows), max_positive_tokens=4), first, rtol=0, atol=0)


def test_parameters_are_checked_before_any_tensor():
    with pytest.raises(ValueError, match="min_weight"):
        W.check("resrl", {"min_weight": 1.5})
    with pytest.raises(ValueError, match="rank"):
        W.check("resrl", {"rank": 0})
    with pytest.raises(ValueError, match="hidden"):
        W.compute([("resrl", {})], dataclasses.replace(stats(), hidden=None))


# --- the objective and the recipe -----------------------------------------------------------------


def _spec(*overrides):
    return build_config(None, ["max_new_tokens=4", *overrides], recipe="resrl").objective


def test_recipe_is_grpo_with_the_resrl_weight_and_no_kl():
    config = build_config(None, [], recipe="resrl")
    spec = config.objective
    assert config.group_size == 4 and config.temperature == 1.0
    assert (spec.advantage, spec.aggregation, spec.clip_low, spec.clip_high, spec.terms) == (
        "group_norm",
        "token_mean",
        0.2,
        0.2,
        (),
    )
    assert spec.pg_weight == (
        (
            "resrl",
            {
                "rank": 64,
                "min_weight": 0.1,
                "positive": 0.1,
                "quantile_low": 0.2,
                "quantile_high": 0.8,
                "max_positive_tokens": 4096,
            },
        ),
    )


def _inputs(spec, rewards=(1.0, 1.0, 0.0, 0.0)):
    gen = torch.Generator().manual_seed(0)
    hidden = HIDDEN.clone().requires_grad_()
    head = Head(torch.randn(5, 4, dtype=F64, generator=gen))
    tokens = torch.randint(0, 5, (len(ROWS),), generator=gen)
    rewards_t = torch.tensor(rewards, dtype=F64)
    lengths = torch.bincount(ROWS).tolist()
    inputs = objectives.ObjectiveInputs(
        policy=ModelOutputs(hidden, head),
        tokens=tokens,
        rows=ROWS,
        advantages=objectives.advantages(spec, rewards_t, None, group_size=4),
        rewards=rewards_t,
        group_pass_rate=objectives.group_pass_rate(objectives.passed(rewards_t), 4),
        token_scale=objectives.token_scale(spec, lengths).double(),
        groups=torch.zeros(4, dtype=torch.long),
    )
    logp = head.logits(hidden).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    return inputs, logp


def test_the_pg_term_scales_each_tokens_advantage_and_logs_the_failed_mean_weight():
    spec = dataclasses.replace(_spec(), pg_weight=(("resrl", {"rank": 1}),))
    inputs, logp = _inputs(spec)
    out = objectives.objective_loss(spec, inputs)
    # A = ±1/√(1/3)·½ = ±√3/2 (unbiased std of (1, 1, 0, 0) is √(1/3)); on-policy the PG loss is
    # Σ_t a_t·w_t·A_i·(−log p(y_t)) in gradient and −Σ_t a_t·w_t·A_i in value, a_t = 1/9
    w = torch.tensor([0.1] * 4 + EXPECTED_FAILED, dtype=F64)
    adv = inputs.advantages[ROWS]
    assert inputs.token_scale.tolist() == pytest.approx([1 / 9] * 9)
    coefficient = inputs.token_scale * w * adv
    assert out.loss_parts["pg"] == pytest.approx(-coefficient.sum().item(), rel=1e-9)
    (got,) = torch.autograd.grad(objectives.objective_loss(spec, inputs).loss, inputs.policy.hidden)
    (expected,) = torch.autograd.grad(-(coefficient * logp).sum(), inputs.policy.hidden)
    torch.testing.assert_close(got, expected)
    metrics = objectives.summarize([(out.token_sums, out.loss_parts, len(ROWS))])
    assert metrics["pg_failed_mean_weight"] == pytest.approx(sum(EXPECTED_FAILED) / 5)
    assert metrics["pg_mean_weight"] == pytest.approx(float(w.mean()))


def test_lambda_1_and_w_min_1_recover_grpo_exactly():
    spec = dataclasses.replace(_spec(), pg_weight=(("resrl", {"rank": 1, "positive": 1.0, "min_weight": 1.0}),))
    grpo = dataclasses.replace(spec, pg_weight=())
    inputs, _ = _inputs(spec)
    assert W.compute(spec.pg_weight, objectives._stats(spec, inputs, *[torch.zeros(len(ROWS))] * 3)).eq(1).all()
    out, base = objectives.objective_loss(spec, inputs), objectives.objective_loss(grpo, inputs)
    assert out.loss.item() == base.loss.item()
    (got,) = torch.autograd.grad(objectives.objective_loss(spec, inputs).loss, inputs.policy.hidden)
    (expected,) = torch.autograd.grad(objectives.objective_loss(grpo, inputs).loss, inputs.policy.hidden)
    assert torch.equal(got, expected)


def test_a_training_step_weights_failures_from_the_policy_hidden_states(tmp_path, say_task, monkeypatch):
    """One `resrl` step on the tiny model with a length-parity verifier (mixed groups): the weight
    sees the trainer's hidden states and passes, and the failed tokens' mean weight is logged."""
    from divrl.trainer import Trainer

    overrides = ["model=tiny", "steps=1", f"output_dir={tmp_path / 'run'}", "prompts_per_step=2"]
    overrides += ["max_new_tokens=8", "eval_size=2", "eval_samples=1", "eval_every=0"]
    cfg = build_config(None, [*overrides, *say_task(range(20), "parity")], recipe="resrl")
    trainer = Trainer(cfg, log=lambda *_: None)
    seen = []
    real = W._WEIGHTS["resrl"]

    def spy(stats, **params):
        weight = real.fn(stats, **params)
        seen.append((stats, weight))
        return weight

    monkeypatch.setitem(W._WEIGHTS, "resrl", dataclasses.replace(real, fn=spy))
    metrics = trainer.train_step(0)
    (stats_, weight), *_ = seen
    assert stats_.hidden is not None and stats_.hidden.shape == (len(stats_.rows), trainer.model.config.hidden_size)
    assert stats_.passed is not None
    failing = ~stats_.passed[stats_.rows]
    assert torch.all(weight[~failing] == 0.1)
    assert ((weight[failing] >= 0.1) & (weight[failing] <= 1.0)).all()
    assert metrics["pg_failed_mean_weight"] == pytest.approx(float(weight[failing].mean()), rel=1e-5)
    mixed = [g for g in stats_.groups.unique() if stats_.passed[stats_.groups == g].unique().numel() == 2]
    assert mixed, "the parity verifier should give a mixed group"
    assert float(weight[failing].min()) == pytest.approx(0.1)  # the lowest residual gets w_min
