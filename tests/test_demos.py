"""Demonstrations and SFT (EKSFT): the file format and its errors, demonstrations built from
answers or from the teacher, offline training on them without generation, and EKSFT's masked
cross-entropy on a hand toy."""

import pytest
import torch

from divrl import demos, objectives
from divrl.config import build_config
from divrl.trainer import Trainer
from test_recipes import TOKENS, _spec, _toy


def test_a_malformed_line_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(demos.DemoError, match=f"{path}:3: a row needs non-empty string 'prompt' and 'completion'"):
        demos.read(path)
    path.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(Exception, match=f"'demonstrations': {path}:2: not valid JSON"):
        build_config(None, [f"demonstrations={path}"], recipe="eksft")
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    assert demos.read(path) == [demos.Demo("a", "b")]


def _run_args(tmp_path, *extra):
    return [
        "model=tiny",
        "prompts_per_step=3",
        "max_new_tokens=8",
        "eval_size=2",
        "eval_samples=1",
        f"output_dir={tmp_path / 'run'}",
        *extra,
    ]


def test_sft_on_answer_demonstrations_trains_without_generating(tmp_path, monkeypatch):
    trainer = Trainer(build_config(None, _run_args(tmp_path, "max_new_tokens=16"), recipe="eksft"), log=lambda *_: None)
    first = trainer.offline_groups[0]
    text = trainer.tokenizer.decode(first.completions[0], skip_special_tokens=True)
    assert text == f"The answer is <answer>{trainer.task.train[0].answer}</answer>." and first.rewards == [1.0]
    assert first.completions[0][-1] == trainer.tokenizer.eos_token_id and first.prompt == trainer.task.train[0].prompt
    # no sampler behind a demonstration: its πold is πθ, not its placeholder log-probs
    # (test_trainer.py::test_demonstrations_are_trained_on_policy_with_top_p_below_one)

    def no_generation(*_, **__):
        raise AssertionError("SFT generated")

    monkeypatch.setattr(trainer, "_sample", no_generation)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    row = trainer.train_step(0)
    assert row["pass_rate"] == 1.0 and 0 < row["pg_masked_fraction"] < 1
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


def test_teacher_demonstrations_are_its_first_passing_samples(tmp_path, say_task):
    args = _run_args(
        tmp_path,
        *say_task(range(12), "always"),
        "teacher=tiny",
        "demonstrations_from=teacher",
        "stored_prompts=4",
        "stored_samples=2",
    )
    trainer = Trainer(build_config(None, args, recipe="eksft"), log=lambda *_: None)
    assert [g.prompt for g in trainer.offline_groups] == [e.prompt for e in trainer.task.train[:4]]
    with pytest.raises(Exception, match="'demonstrations_from' is 'teacher' but no 'teacher' is set"):
        build_config(None, _run_args(tmp_path, "demonstrations_from=teacher"), recipe="eksft")


def test_eksft_drops_the_top_entropy_and_top_kl_tokens_from_the_cross_entropy():
    spec = _spec("eksft")
    inputs, logp = _toy(spec, [1.0, 1.0, 1.0, 1.0])  # demonstrations: every A = +1
    policy, ref = inputs.policy, inputs.models["reference"]
    lp = policy.head.logits(policy.hidden).log_softmax(-1).detach()
    lr = ref.head.logits(ref.hidden).log_softmax(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    kl = (lp.exp() * (lp - lr)).sum(-1)
    top_h = torch.zeros(8, dtype=torch.bool)
    top_h[entropy.topk(2).indices] = True  # ⌈0.2·8⌉ = 2
    top_kl = torch.zeros(8, dtype=torch.bool)
    top_kl[kl.topk(2).indices] = True
    kept = ~(top_h | top_kl)
    out = objectives.objective_loss(spec, inputs)
    assert out.loss_parts["pg"] == pytest.approx(float((-logp)[kept].mean()), rel=1e-5)
    assert out.loss_parts["reverse_kl_to_reference"] == pytest.approx(0.05 * float(kl[top_kl].mean()), rel=1e-5)
    assert out.token_sums["pg_masked_fraction"] == int((~kept).sum())


def test_demo_rl_clones_a_reference_from_demonstrations_then_regularizes_toward_it(tmp_path):
    args = _run_args(tmp_path, "behaviour_cloning_steps=3", "group_size=2", "checkpoint_every=1")
    trainer = Trainer(build_config(None, [*args, "steps=1"], recipe="demo-rl"), log=lambda *_: None)
    cloned = tmp_path / "run" / "behaviour_cloned"
    assert (cloned / "config.json").is_file()
    initial, _ = __import__("divrl").models.load_model("tiny", seed=0)
    moved = [not torch.equal(a.to(b.dtype), b) for a, b in zip(initial.parameters(), trainer.reference.parameters())]
    assert any(moved)  # the reference is the cloned model, not the initial weights
    # at bf16 the frozen reference stores its linears in bf16 (`frozen_for`): the policy's, rounded
    assert all(
        torch.equal(a.to(b.dtype), b) for a, b in zip(trainer.model.parameters(), trainer.reference.parameters())
    )
    row = trainer.train_step(0)
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at π_BC
    trainer.run()
    resumed = Trainer(build_config(None, [*args, "steps=2", "resume=true"], recipe="demo-rl"), log=lambda *_: None)
    assert all(torch.equal(a, b) for a, b in zip(resumed.reference.parameters(), trainer.reference.parameters()))


def test_ps_kd_is_the_cross_entropy_to_the_demonstration_mixed_with_the_previous_model():
    spec = _spec("ps-kd")
    assert [round(t.coef_at(10), 6) for t in spec.terms] == [0.6, 0.4]  # α_10 = 0.8·10/20
    inputs, _logp = _toy(spec, [1.0, 1.0, 1.0, 1.0])
    out = objectives.objective_loss(spec.at_step(10), inputs)
    ref = inputs.models["reference"]
    lr = ref.head.logits(ref.hidden).log_softmax(-1)
    lp = inputs.policy.head.logits(inputs.policy.hidden).log_softmax(-1)
    cross_entropy = -((0.6 * torch.nn.functional.one_hot(TOKENS, 5) + 0.4 * lr.exp()) * lp).sum(-1)
    entropy_prev = -(lr.exp() * lr).sum(-1)  # CE(q, πθ) − 0.4·H(p_prev) is what the terms sum to
    assert out.loss.item() == pytest.approx(float((cross_entropy - 0.4 * entropy_prev).mean()), rel=1e-5)
    (got,) = torch.autograd.grad(out.loss, inputs.policy.hidden)
    (want,) = torch.autograd.grad(cross_entropy.mean(), inputs.policy.hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_the_reference_is_refreshed_from_the_policy_and_resumes_only_at_a_refresh(tmp_path):
    args = _run_args(tmp_path, "reference_refresh_every=2", "checkpoint_every=2", "eval_every=0")
    trainer = Trainer(build_config(None, [*args, "steps=3"], recipe="ps-kd"), log=lambda *_: None)
    initial = [p.detach().clone() for p in trainer.reference.parameters()]
    trainer.run()
    # refreshed after step 2, not after step 3: the reference is the policy of step 2 (its checkpoint)
    assert any(not torch.equal(a.to(b.dtype), b) for a, b in zip(initial, trainer.reference.parameters()))
    assert any(
        not torch.equal(a.to(b.dtype), b) for a, b in zip(trainer.model.parameters(), trainer.reference.parameters())
    )
    with pytest.raises(Exception, match="'checkpoint_every' must be a multiple of reference_refresh_every"):
        build_config(None, [*args, "checkpoint_every=3"], recipe="ps-kd")
    with pytest.raises(Exception, match="not at a refresh of the reference"):
        Trainer(build_config(None, [*args, "steps=4", "resume=true"], recipe="ps-kd"), log=lambda *_: None).run()


def test_a_reference_refresh_is_a_no_op_when_no_reference_is_loaded(tmp_path):
    # nothing reads a reference here (no KL term, no kl metric), so none is loaded; a refresh
    # used to call load_state_dict on None
    args = _run_args(tmp_path, "kl_coef=0.0", "monitor_kl=false", "reference_refresh_every=1", "checkpoint_every=1")
    trainer = Trainer(build_config(None, [*args, "eval_every=0", "steps=1"], recipe="grpo"), log=lambda *_: None)
    assert trainer.reference is None
    trainer.run()
    assert trainer.step == 1
