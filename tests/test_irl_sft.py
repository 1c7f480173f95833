"""irl-sft (IRL imitation, Wulfmeier et al. 2024): token cross-entropy plus the TD regularizer
λ·(z_y − γ·V(s′))², V = logsumexp of the logits, V = 0 after a completion's last token. The TD term
on hand-computed numbers, its gradient against full logits, the streamed (z_y, lse), λ = 0 equal to
SFT exactly (loss and gradients, and a whole training step), and its metrics."""

import math

import pytest
import torch

from divrl import chunked, objectives
from divrl.chunked import Head
from divrl.config import build_config
from divrl.rowwise import ModelOutputs
from divrl.spec import SpecError, parse_objective
from divrl.trainer import Trainer

# One demonstration of 2 tokens over a vocabulary of 3; the head is the identity, so the hidden
# states are the logits.
LOGITS = [[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]]
TOKENS = [1, 2]


def _spec(coef, gamma=0.9):
    return build_config(None, [f"td_regularizer={{coef: {coef}, gamma: {gamma}}}"], recipe="irl-sft").objective


def _inputs(spec, logits, tokens, lengths, dtype=torch.float64):
    hidden = torch.tensor(logits, dtype=dtype).requires_grad_()
    n_rows = len(lengths)
    rewards = torch.ones(n_rows, dtype=dtype)
    return objectives.ObjectiveInputs(
        policy=ModelOutputs(hidden, Head(torch.eye(hidden.shape[1], dtype=dtype))),
        tokens=torch.tensor(tokens),
        rows=torch.repeat_interleave(torch.arange(n_rows), torch.tensor(lengths)),
        advantages=objectives.advantages(spec, rewards, None, group_size=1),
        rewards=rewards,
        group_pass_rate=torch.ones(n_rows, dtype=dtype),
        token_scale=objectives.token_scale(spec, lengths).to(dtype),
    )


def test_the_recipe_is_offline_sft_on_demonstrations_plus_the_td_term():
    cfg = build_config(None, [], recipe="irl-sft")
    spec = cfg.objective
    assert cfg.offline and cfg.offline_data == "demonstrations" and cfg.temperature == 1.0
    assert (spec.advantage, spec.pg_loss, spec.aggregation, spec.terms) == ("signed", "reinforce", "token_mean", ())
    assert (spec.td_regularizer.coef, spec.td_regularizer.gamma) == (0.01, 0.99)


def test_td_term_on_hand_computed_numbers():
    # λ = 0.5, γ = 0.9. lse₁ = log(e¹ + e² + e⁰) = 2.407606, lse₂ = log(e^0.5 + e^−1 + e^1.5) = 1.871539;
    # r₁ = z₁[1] − γ·lse₂ = 2 − 0.9·1.871539 = 0.315615, r₂ = z₂[2] − γ·0 = 1.5 (terminal);
    # TD = λ·mean(r²) = 0.5·(0.099613 + 2.25)/2 = 0.587403; CE = mean(lse − z_y) = (0.407606 + 0.371539)/2
    lse1 = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.0))
    lse2 = math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(1.5))
    assert (lse1, lse2) == (pytest.approx(2.407606, abs=1e-6), pytest.approx(1.871539, abs=1e-6))
    r1, r2 = 2.0 - 0.9 * lse2, 1.5
    spec = _spec(0.5)
    out = objectives.objective_loss(spec, _inputs(spec, LOGITS, TOKENS, [2]))
    assert out.loss_parts["td"] == pytest.approx(0.5 * (r1**2 + r2**2) / 2, rel=1e-12)
    assert out.loss_parts["td"] == pytest.approx(0.587403, abs=1e-6)
    assert out.loss_parts["pg"] == pytest.approx(((lse1 - 2.0) + (lse2 - 1.5)) / 2, rel=1e-12)
    assert out.loss_parts["pg"] == pytest.approx(0.389572, abs=1e-6)
    assert out.token_sums["td_squared"] == pytest.approx(r1**2 + r2**2, rel=1e-12)
    assert out.token_sums["td_reward"] == pytest.approx(r1 + r2, rel=1e-12)
    assert out.token_sums["soft_value"] == pytest.approx(lse1 + lse2, rel=1e-12)
    metrics = objectives.summarize([(out.token_sums, out.loss_parts, 2)])
    assert metrics["td_loss"] == pytest.approx(0.587403, abs=1e-6) and metrics["td_squared"] == pytest.approx(
        (r1**2 + r2**2) / 2
    )


def test_td_gradient_matches_full_logits_and_flows_through_the_next_value():
    spec = _spec(0.5)
    inputs = _inputs(spec, LOGITS, TOKENS, [2])
    out = objectives.objective_loss(spec, inputs)
    (got,) = torch.autograd.grad(out.loss, inputs.policy.hidden)
    z = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    lse = z.logsumexp(-1)
    q = z[torch.arange(2), torch.tensor(TOKENS)]
    residual = q - 0.9 * torch.cat([lse[1:], lse.new_zeros(1)])
    (want,) = torch.autograd.grad(((lse - q) + 0.5 * residual**2).mean(), z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # by hand at s₂ (token mean ½, λ = 0.5, γ = 0.9): the cross-entropy gives p₂ − onehot(2); r₂ = 1.5
    # gives λ·2r₂·onehot(2); r₁ reaches s₂ through V(s₂): λ·2r₁·(−γ)·p₂
    p2 = torch.softmax(torch.tensor(LOGITS[1], dtype=torch.float64), -1)
    onehot = torch.eye(3, dtype=torch.float64)[2]
    r1 = 2.0 - 0.9 * float(torch.tensor(LOGITS[1], dtype=torch.float64).logsumexp(-1))
    hand = 0.5 * ((p2 - onehot) + 0.5 * (2 * 1.5 * onehot - 2 * 0.9 * r1 * p2))
    torch.testing.assert_close(got[1], hand, rtol=1e-12, atol=1e-14)


def test_the_next_value_never_crosses_into_the_next_completion():
    z = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    lse = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    rows = torch.tensor([0, 0, 1, 1, 1])
    got = objectives.td_residual(z, lse, rows, 0.5)
    torch.testing.assert_close(got, torch.tensor([1.0 - 10.0, 2.0, 3.0 - 20.0, 4.0 - 25.0, 5.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_logit_and_lse_are_the_full_logits_and_their_difference_is_logprob_entropy(dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 4, dtype=dtype, generator=gen).requires_grad_()
    weight = torch.randn(11, 4, dtype=dtype, generator=gen).requires_grad_()
    head = Head(weight, torch.randn(11, dtype=dtype, generator=gen).requires_grad_())
    tokens = torch.tensor([0, 3, 10, 4, 4, 2, 9])
    z, lse, entropy = chunked.logit_lse_entropy(hidden, head, tokens, chunk_tokens=3, chunk_vocab=4)
    logits = head.logits(hidden)
    torch.testing.assert_close(z, logits.gather(1, tokens[:, None]).squeeze(1))
    torch.testing.assert_close(lse, logits.logsumexp(-1))
    logp, entropy_ref = chunked.logprob_entropy(hidden, head, tokens, chunk_tokens=3, chunk_vocab=4)
    assert torch.equal(z - lse, logp) and torch.equal(entropy, entropy_ref)
    weights = torch.randn(7, dtype=dtype, generator=gen)
    inputs = (hidden, head.weight, head.bias)
    got = torch.autograd.grad((weights * (z + 2 * lse)).sum(), inputs)
    full = logits.gather(1, tokens[:, None]).squeeze(1) + 2 * logits.logsumexp(-1)
    want = torch.autograd.grad((weights * full).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lambda_zero_is_exactly_the_sft_cross_entropy(dtype):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 5, dtype=dtype, generator=gen).tolist()
    tokens, lengths = [0, 3, 1, 4, 4, 2, 0, 1], [2, 1, 3, 2]
    sft = parse_objective({"advantage": "signed", "pg_loss": "reinforce"})  # behaviour cloning's SFT
    results = []
    for spec in (sft, _spec(0.0)):
        inputs = _inputs(spec, logits, tokens, lengths, dtype)
        out = objectives.objective_loss(spec, inputs)
        (grad,) = torch.autograd.grad(out.loss, inputs.policy.hidden)
        results.append((out, grad))
    (plain, plain_grad), (irl, irl_grad) = results
    assert torch.equal(plain.loss, irl.loss) and torch.equal(plain_grad, irl_grad)
    assert torch.equal(plain.logprobs, irl.logprobs)
    assert "td" not in irl.loss_parts and irl.token_sums["td_squared"] > 0  # measured, not trained
    z = torch.tensor(logits, dtype=dtype)
    ce = (z.logsumexp(-1) - z[torch.arange(8), torch.tensor(tokens)]).mean()
    assert float(plain.loss.detach()) == pytest.approx(float(ce), rel=1e-6)


def _args(tmp_path, *extra):
    return [
        "model=tiny",
        "prompts_per_step=3",
        "max_new_tokens=8",
        "eval_size=2",
        "eval_samples=1",
        f"output_dir={tmp_path}",
        *extra,
    ]


def test_a_training_step_at_lambda_zero_is_the_sft_step_and_logs_the_td_metrics(tmp_path):
    models, rows = [], []
    for name, td in (("sft", "td_regularizer=null"), ("zero", "td_regularizer={coef: 0.0}"), ("irl", None)):
        args = _args(tmp_path / name, *([td] if td else []))
        trainer = Trainer(build_config(None, args, recipe="irl-sft"), log=lambda *_: None)
        rows.append(trainer.train_step(0))
        models.append([p.detach().clone() for p in trainer.model.parameters()])
    (sft, zero, irl), (sft_row, zero_row, irl_row) = models, rows
    assert all(torch.equal(a, b) for a, b in zip(sft, zero))  # λ = 0: the SFT step, bit for bit
    assert zero_row["pg_loss"] == sft_row["pg_loss"] and "td_loss" not in zero_row and "td_squared" in zero_row
    assert any(not torch.equal(a, b) for a, b in zip(sft, irl))  # λ > 0 moves the weights elsewhere
    assert irl_row["pg_loss"] == sft_row["pg_loss"]  # same data, same starting weights
    assert irl_row["td_loss"] == pytest.approx(0.01 * irl_row["td_squared"], rel=1e-5)
    assert irl_row["loss"] == pytest.approx(irl_row["pg_loss"] + irl_row["td_loss"], rel=1e-6)
    assert 0 < irl_row["td_share"] < 1 and "soft_value" in irl_row and "td_reward" in irl_row


def test_td_regularizer_values_are_checked():
    with pytest.raises(SpecError, match=r"td_regularizer\.gamma: must be in \[0, 1\]"):
        parse_objective({"td_regularizer": {"gamma": 1.5}})
    with pytest.raises(SpecError, match=r"td_regularizer\.coef: must be a finite number ≥ 0"):
        parse_objective({"td_regularizer": {"coef": -1}})
    with pytest.raises(SpecError, match="td_regularizer"):
        parse_objective({"td_regularizer": {"lambda": 0.1}})
    spec = parse_objective({"policy_gradient": False, "td_regularizer": {"coef": 0.1}})  # the TD term alone trains
    assert spec.td_regularizer.coef == 0.1 and "0.1·(z_y − 0.99·lse′)²" in spec.describe()
