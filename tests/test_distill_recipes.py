"""Distillation recipes (issue 8): each formula on a hand toy (5-word vocabulary, a few tokens),
the equalities the papers state (G-OPD at λ = 1 is OPD; TRRD at α = 1 is GRPO), and the lab where
a closed form exists."""

import dataclasses
import math

import pytest
import torch

from divrl import lab, objectives, targets
from divrl.rowwise import ModelOutputs
from test_recipes import LENGTHS, ROWS, TOKENS, _spec, _toy


def _with_teacher(inputs, seed=7, old=None):
    gen = torch.Generator().manual_seed(seed)
    teacher = ModelOutputs(
        torch.randn(len(TOKENS), 3, dtype=torch.float64, generator=gen),
        objectives.chunked.Head(torch.randn(5, 3, dtype=torch.float64, generator=gen)),
    )
    return dataclasses.replace(inputs, models={**inputs.models, "teacher": teacher}, old_logprobs=old)


def _logp(model, tokens=TOKENS):
    return model.head.logits(model.hidden).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def _grad(loss, inputs):
    return torch.autograd.grad(loss, inputs.policy.hidden)[0]


def test_opd_dense_mode_advantage_is_the_negative_log_ratio_to_the_teacher():
    spec = _spec(
        "opd", "policy_gradient=true", "advantage=none", "terms[0].estimator=k1", "terms[0].placement=token_reward"
    )
    inputs, logp = _toy(spec, [1.0, 0.0, 0.0, 1.0])
    inputs = _with_teacher(inputs)
    teacher = _logp(inputs.models["teacher"])
    out = objectives.objective_loss(spec, inputs)
    advantage = -(logp - teacher).detach()  # per token, no baseline, no task reward
    expected = -(advantage * torch.exp(logp - logp.detach())).sum() / len(TOKENS)
    torch.testing.assert_close(_grad(out.loss, inputs), _grad(expected, inputs))
    assert out.token_sums["reverse_kl_to_teacher"] == pytest.approx(float((logp - teacher).sum()), rel=1e-6)


def test_opd_dense_mode_has_the_exact_reverse_kl_gradient_in_expectation():
    """Every token of a 5-word vocabulary as a one-token completion weighted by its probability:
    the dense-reward step equals the exact reverse-KL step (the lab's enumeration)."""
    ref, reward = lab.random_problem(5, (2,), seed=1)
    teacher = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).log_softmax(-1)
    exact = _spec("opd")
    dense = _spec(
        "opd", "policy_gradient=true", "advantage=none", "terms[0].estimator=k1", "terms[0].placement=token_reward"
    )
    steps = [
        lab.objective_fixed_point(s, reward, {"reference": ref, "teacher": teacher}, steps=1, lr=0.5)
        for s in (exact, dense)
    ]
    torch.testing.assert_close(steps[0], steps[1])


@pytest.mark.parametrize("reference_seed", [3, 4])
def test_g_opd_at_lambda_one_is_opd_dense_mode_whatever_the_reference(reference_seed):
    opd = _spec(
        "opd",
        "policy_gradient=true",
        "advantage=none",
        "terms[0].estimator=k1",
        "terms[0].placement=token_reward",
        "clip_high=0.2",
    )
    g_opd = _spec("g-opd", "group_size=2")
    inputs, _ = _toy(g_opd, [1.0, 0.0, 0.0, 1.0])
    inputs = _with_teacher(inputs)
    gen = torch.Generator().manual_seed(reference_seed)
    reference = ModelOutputs(
        torch.randn(len(TOKENS), 3, dtype=torch.float64, generator=gen),
        objectives.chunked.Head(torch.randn(5, 3, dtype=torch.float64, generator=gen)),
    )
    inputs = dataclasses.replace(
        inputs, models={**inputs.models, "reference": reference}, advantages=torch.zeros(4, dtype=torch.float64)
    )
    a, b = objectives.objective_loss(opd, inputs), objectives.objective_loss(g_opd, inputs)
    assert a.loss.item() == b.loss.item()  # bit for bit: extrapolate(·, teacher, 1) is the teacher
    torch.testing.assert_close(_grad(a.loss, inputs), _grad(b.loss, inputs), rtol=0, atol=0)


def test_exopd_reward_is_lambda_log_teacher_over_reference_minus_log_policy_over_reference():
    spec = _spec("exopd", "group_size=2")
    inputs, logp = _toy(spec, [1.0, 0.0, 0.0, 1.0])
    inputs = dataclasses.replace(_with_teacher(inputs), advantages=torch.zeros(4, dtype=torch.float64))
    teacher, ref = _logp(inputs.models["teacher"]), _logp(inputs.models["reference"])
    advantage = (1.25 * (teacher - ref) - (logp - ref)).detach()  # RUCBM/G-OPD dp_actor.py, λ = 1.25
    expected = -(advantage * torch.exp(logp - logp.detach())).sum() / len(TOKENS)
    out = objectives.objective_loss(spec, inputs)
    torch.testing.assert_close(_grad(out.loss, inputs), _grad(expected, inputs))


def test_kdrl_anneals_its_coefficient_and_masks_by_reward():
    spec = _spec("kdrl")
    (term,) = spec.terms
    assert (term.estimator, term.coef_at(0), term.coef_at(40), term.coef_at(80), term.coef_at(200)) == (
        "k2",
        0.005,
        pytest.approx(0.003),
        pytest.approx(0.001),
        pytest.approx(0.001),
    )
    assert spec.at_step(40).terms[0].coef == pytest.approx(0.005 - 5e-5 * 40)  # max(5e-3 − 5e-5·t, 1e-3)
    masked = _spec("kdrl", "terms[0].mask={failed: {}}")
    inputs, logp = _toy(masked, [1.0, 0.0, 0.0, 1.0])
    inputs = _with_teacher(inputs)
    teacher = _logp(inputs.models["teacher"])
    out = objectives.objective_loss(masked.at_step(0), inputs)
    failed = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)[ROWS]
    k2 = 0.5 * (logp - teacher) ** 2
    assert out.loss_parts["reverse_kl_to_teacher"] == pytest.approx(
        0.005 * float((failed * k2).sum()) / len(TOKENS), rel=1e-6
    )
    group = _spec("kdrl", "terms[0].mask={group_unsolved: {}}")
    inputs, _ = _toy(group, [0.0, 0.0, 1.0, 0.0])  # group 1 all wrong: only its KD survives
    out = objectives.objective_loss(group, _with_teacher(inputs))
    assert out.token_sums["reverse_kl_to_teacher_masked_fraction"] == LENGTHS[2] + LENGTHS[3]


def test_trrd_ratio_is_against_the_geometric_anchor_and_alpha_one_is_grpo():
    spec = _spec("trrd")
    inputs, logp = _toy(spec, [1.0, 0.0, 0.0, 1.0])
    old = (logp + torch.tensor([0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3], dtype=torch.float64)).detach()
    inputs = _with_teacher(inputs, old=old)
    teacher = _logp(inputs.models["teacher"])
    log_r = 0.5 * (logp - old) + 0.5 * (logp - teacher).clamp(-1, 1)
    adv = inputs.advantages[ROWS]
    r = log_r.exp()
    per_token = -torch.minimum(r * adv, r.clamp(0.8, 1.28) * adv)
    expected = (per_token / torch.tensor(LENGTHS, dtype=torch.float64)[ROWS]).sum() / 4  # seq-mean-token-mean
    out = objectives.objective_loss(spec, inputs)
    assert out.loss_parts["pg"] == pytest.approx(expected.item(), rel=1e-6)
    grpo = dataclasses.replace(spec, pg_loss="clipped", pg_loss_params=())
    alpha_one = dataclasses.replace(
        spec, pg_loss_params=(("alpha", 1.0), ("clip_low", 0.2), ("clip_high", 0.28), ("teacher_clamp", 1.0))
    )
    a, b = objectives.objective_loss(grpo, inputs), objectives.objective_loss(alpha_one, inputs)
    assert a.loss_parts["pg"] == b.loss_parts["pg"]  # bit-identical
    torch.testing.assert_close(_grad(a.loss, inputs), _grad(b.loss, inputs), rtol=0, atol=0)


def test_gdsd_regresses_the_length_normalized_clipped_log_ratio_onto_psi_times_the_advantage():
    spec = _spec("gdsd", "kl_coef=0")  # the regression alone (the recipe adds 1e-4·k2 to the reference)
    inputs, logp = _toy(spec, [1.0, 0.0, 0.5, 0.5])
    old = (logp + torch.tensor([0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3], dtype=torch.float64)).detach()
    inputs = dataclasses.replace(inputs, old_logprobs=old)
    log_ratio = torch.zeros(4, dtype=torch.float64).index_add(0, ROWS, logp - old)
    bounded = log_ratio.clamp(math.log(0.8), math.log(1.2))
    lengths = torch.tensor(LENGTHS, dtype=torch.float64)
    advantage = torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=torch.float64)  # mean-only, groups of 2
    expected = ((bounded / lengths - 10 * advantage) ** 2).mean()
    out = objectives.objective_loss(spec, inputs)
    assert out.loss_parts["pg"] == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(_grad(out.loss, inputs), _grad(expected, inputs))


def test_gdsd_zero_residual_point_is_the_tilt_up_to_normalization():
    """One-token completions of every word, exact A: at πθ ∝ πold·exp(ψA) every residual
    log πθ/πold − ψA is the same constant −log Z, so the regression's gradient vanishes exactly
    when normalization is free, i.e. GDSD matches the tilted optimum of reverse-KL RL (β = 1/ψ)."""
    old = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05], dtype=torch.float64).log()
    advantage = torch.tensor([0.3, -0.1, 0.2, -0.4, 0.0], dtype=torch.float64)
    tilt = lab.tilted(old, advantage, 1 / 10.0)
    residual = (tilt - old) - 10.0 * advantage
    torch.testing.assert_close(residual, residual.mean().expand(5))


def test_paced_distill_weights_by_pass_rate_and_switches_forward_to_reverse_after_ten_steps():
    spec = _spec("paced-distill")
    assert [t.divergence for t in spec.terms] == ["forward_kl", "reverse_kl"]
    assert [(t.coef_at(9), t.coef_at(10)) for t in spec.terms] == [(1.0, 0.0), (0.0, 1.0)]
    inputs, _ = _toy(spec, [1.0, 0.0, 1.0, 1.0])  # p̂ = ½ and 1: w = ¼ and 0
    inputs = _with_teacher(inputs)
    out = objectives.objective_loss(spec.at_step(0), inputs)
    logp = inputs.policy.head.logits(inputs.policy.hidden).log_softmax(-1)
    teacher = inputs.models["teacher"]
    logq = teacher.head.logits(teacher.hidden).log_softmax(-1)
    forward = (logq.exp() * (logq - logp)).sum(-1)
    w = torch.tensor([0.25, 0.25, 0.0, 0.0], dtype=torch.float64)[ROWS]
    assert out.loss_parts["forward_kl_to_teacher"] == pytest.approx(float((w * forward).sum()) / len(TOKENS), rel=1e-5)
    assert "reverse_kl_to_teacher" not in out.loss_parts  # coefficient 0 in the first stage


def test_exopd_dense_reward_reaches_the_extrapolated_target_in_the_lab():
    """One-token completions: the dense reward's expected gradient is ∇KL(πθ‖q), q the normalized
    extrapolated target (its log Z has zero-mean score), so the fixed point is C7's target."""
    ref, reward = lab.random_problem(5, (2,), seed=0)
    teacher = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    spec = _spec("exopd", "group_size=2")
    got = lab.objective_fixed_point(spec, reward, {"reference": ref, "teacher": teacher}, steps=600, lr=3.0)
    torch.testing.assert_close(got.exp(), targets.extrapolate(ref, teacher, 1.25).exp(), atol=1e-6, rtol=0)


def erpd_args(tmp_path, say_task) -> list[str]:
    """A two-stage ERPD run on the tiny model: stage 1 two steps (one checkpoint, at its end), stage 2 one."""
    return [
        "model=tiny",
        *say_task(range(24), "parity"),
        "max_new_tokens=6",
        "eval_size=2",
        "eval_samples=1",
        "prompts_per_step=2",
        "steps=1",
        f"output_dir={tmp_path / 'run'}",
        "stage1.steps=2",
        "stage1.checkpoint_every=2",
        "stage1.stored_prompts=4",
        "stage1.stored_samples=4",
        "stage1.prompts_per_step=2",
    ]


def test_erpd_trains_stage_one_then_distils_it_as_the_teacher(tmp_path, say_task):
    from divrl.config import build_config
    from divrl.runlog import read_metrics
    from divrl.trainer import Trainer

    args = erpd_args(tmp_path, say_task)
    trainer = Trainer(build_config(None, args, recipe="erpd"), log=lambda *_: None)
    final = tmp_path / "run" / "stage1" / "checkpoints" / "step-2"
    assert (final / "config.json").is_file() and (tmp_path / "run" / "stage1" / "metrics.jsonl").is_file()
    stage1_model, _ = __import__("divrl").models.load_model(str(final))
    # at bf16 the frozen teacher stores its linears in bf16 (`frozen_for`): stage 1's, rounded
    assert all(torch.equal(a.to(b.dtype), b) for a, b in zip(stage1_model.parameters(), trainer.teacher.parameters()))
    assert all(
        torch.equal(a.to(b.dtype), b) for a, b in zip(trainer.model.parameters(), trainer.reference.parameters())
    )
    trainer.run()
    (row,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert row["reverse_kl_to_teacher"] != 0 and "kl" in row and row["stage"] == 2
    assert {r["stage"] for r in read_metrics(tmp_path / "run" / "stage1" / "metrics.jsonl") if "reward" in r} == {1}
    with pytest.raises(Exception, match=r"config key 'stage1\.stepz'"):
        build_config(None, [*args, "stage1.stepz=3"], recipe="erpd")
    with pytest.raises(Exception, match="'teacher' must be null with stage1"):
        build_config(None, [*args, "teacher=tiny"], recipe="erpd")
    with pytest.raises(Exception, match=r"config key 'stage1\.offline_shortest' must be in"):
        build_config(None, [*args, "stage1.offline_shortest=0"], recipe="erpd")


def test_distillation_bad_input_is_refused_before_any_model_loads():
    from divrl.config import build_config

    with pytest.raises(Exception, match="lam must be a finite number ≥ 0"):
        build_config(None, ["teacher=tiny", "terms[0].target.extrapolate.lam=-0.5"], recipe="exopd")
    for recipe in ("opd", "sinkd", "kdrl", "paced-distill", "g-opd"):
        with pytest.raises(Exception, match="needs a teacher model; set 'teacher'"):
            build_config(None, [], recipe=recipe)
    with pytest.raises(Exception, match=r"pg_loss\.trrd: reads the teacher's log-probs"):
        build_config(None, [], recipe="trrd")


def test_gdsd_on_policy_with_its_reference_kl_reaches_the_tilt_like_grpo_plus_reverse_kl():
    """On policy (πold = πθ each step, ratio 1 inside the clip), the regression's gradient is
    −2ψ·∇E[A]: a policy gradient. With β·k2 to the reference its fixed point is C1's tilt of the
    reference with β/(2ψ) — the optimum GRPO + reverse KL reaches (test_objective_lab)."""
    ref, reward = lab.random_problem(5, (2,), seed=0)
    spec = _spec("gdsd", "kl_coef=10")  # ψ = 10: effective β = 10/(2·10) = 0.5
    got = lab.objective_fixed_point(spec, reward, {"reference": ref}, steps=3000, lr=0.3)
    torch.testing.assert_close(got.exp(), lab.tilted(ref, reward, 0.5).exp(), atol=1e-6, rtol=0)
