import json
import math
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from divrl import attention, chunked
from divrl.checkpoint import checkpoint_dirs
from divrl.config import ConfigError, build_config
from divrl.hidden import completion_hidden
from divrl.models import output_head
from divrl.runlog import read_metrics
from divrl.trainer import Trainer
from test_distill_recipes import erpd_args


def tiny_cfg(tmp_path, *extra, recipe: str | None = None):
    return build_config(
        None,
        [
            "model=tiny",
            "steps=2",
            f"output_dir={tmp_path / 'run'}",
            "prompts_per_step=2",
            "group_size=4",
            "max_new_tokens=6",
            "eval_size=4",
            "eval_samples=2",
            "train_size=50",
            "lr=1e-3",
            "checkpoint_every=1",
            "eval_every=0",
            *extra,
        ],
        recipe=recipe,
    )


def test_two_steps_change_the_weights_and_write_the_run(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "kl_coef=0.1"), log=lambda *_: None)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    summary = trainer.run()
    changed = [k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])]
    assert changed, "no parameter moved"
    held = [k for k, v in trainer.model.named_parameters() if v.grad is not None]
    assert not held, f"gradients kept after the optimizer step: {held[:3]}"
    run = tmp_path / "run"
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    for key in ("reward", "entropy", "grad_norm", "time_step", "reward_errors"):
        assert key in steps[0]
    assert summary["before"]["eval_prompts"] == 4 and "eval_pass@2" in summary["after"]
    for name in ("config.yaml", "report.md", "curves.png"):
        assert (run / name).is_file()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pass@1" in (run / "report.md").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_kl_of_a_model_against_itself_is_zero(tiny):
    model, tokenizer = tiny
    with torch.no_grad():
        batch = completion_hidden(model, [[1, 2, 3], [7, 8]], [[4, 5, 6], [9], [10, 11], [12]], tokenizer.pad_token_id)
        kl = chunked.divergence("reverse_kl", batch.hidden, output_head(model), batch.hidden, output_head(model))
    assert kl.shape == (7,)
    torch.testing.assert_close(kl, torch.zeros(7), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bucket_overhead", [0, 2, 10**6])  # a bucket per length, some, one
def test_shared_prompt_forward_matches_full_sequences(tiny, hidden_path, bucket_overhead):
    """Prompt computed once (packed with its completions, or its KV selected for each of its G
    completions) == each prompt+completion run on its own, for log-probs and their gradients
    (prompts of different lengths, ragged completions, one of a single token), however the rows
    are bucketed by length."""
    model, tokenizer = tiny
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, 11, 12], [13], [14, 15], [16, 17, 18]]  # G = 2, group-major
    batch = completion_hidden(model, prompts, completions, tokenizer.pad_token_id, bucket_overhead=bucket_overhead)
    lp, _ = chunked.logprob_entropy(batch.hidden, output_head(model), batch.tokens)
    (grad,) = torch.autograd.grad(lp.sum(), model.model.layers[0].self_attn.q_proj.weight)

    expected = []
    for row, completion in enumerate(completions):
        seq = prompts[row // 2] + completion
        logits = model(torch.tensor([seq])).logits[0].log_softmax(-1)
        expected += [logits[len(seq) - len(completion) - 1 + j, tok] for j, tok in enumerate(completion)]
    expected = torch.stack(expected)
    (expected_grad,) = torch.autograd.grad(expected.sum(), model.model.layers[0].self_attn.q_proj.weight)
    assert batch.tokens.tolist() == [t for c in completions for t in c]
    assert batch.rows.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3]
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_length_buckets_minimize_padded_tokens_plus_overhead():
    """The dynamic programme's split against every split of the sorted rows into contiguous runs."""
    import itertools as it

    from divrl.hidden import length_buckets

    for lengths, overhead in (([5, 1, 9, 9, 2, 7, 3], 4), ([3, 3, 3], 1), ([8, 1, 1, 1, 1], 2), ([4], 0)):
        ordered = sorted(lengths, reverse=True)

        def cost(parts, overhead=overhead):
            return sum(overhead + len(p) * max(p) for p in parts)

        best = min(
            cost([ordered[a:b] for a, b in zip((0, *cuts), (*cuts, len(ordered)))])
            for k in range(len(ordered))
            for cuts in it.combinations(range(1, len(ordered)), k)
        )
        buckets = length_buckets(lengths, overhead)
        assert sorted(r for b in buckets for r in b) == list(range(len(lengths)))
        assert cost([[lengths[r] for r in b] for b in buckets]) == best


def test_completion_hidden_refuses_empty_completions_and_ragged_groups(tiny):
    """An empty completion would shift every later row's hidden states by one; completions that are
    not G per prompt have no group."""
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"non-empty completions per prompt.*lengths \[1, 0\]"):
        completion_hidden(model, [[5, 6]], [[7], []], tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"got 3 completions .* for 2 prompts"):
        completion_hidden(model, [[5, 6], [8]], [[7], [9], [10]], tokenizer.pad_token_id)


def test_prompt_positions_are_the_full_sequence_predictions_of_the_prompt_tokens(tiny, hidden_path):
    model, tokenizer = tiny
    prompts = [[5, 6, 7], [8, 9]]
    batch = completion_hidden(model, prompts, [[10], [11, 12], [13], [14]], tokenizer.pad_token_id, with_prompt=True)
    lp, _ = chunked.logprob_entropy(batch.prompt.hidden, output_head(model), batch.prompt.tokens)
    expected = []
    for prompt in prompts:
        logits = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
        expected += [logits[j, tok] for j, tok in enumerate(prompt[1:])]
    assert batch.prompt.tokens.tolist() == [6, 7, 9] and batch.prompt.rows.tolist() == [0, 0, 1]
    torch.testing.assert_close(lp, torch.stack(expected).detach(), atol=1e-5, rtol=1e-5)
    assert lp.requires_grad  # the prompt's positions train too


def test_prompt_positions_weigh_the_same_at_any_micro_batch_size(tmp_path):
    """Under seq_mean_token_mean each completion's tokens have their own a_t = 1/(B·L_i); a prompt
    position takes the whole batch's mean a_t (a micro-batch's own mean made the loss depend on
    how the batch was split)."""
    extra = [
        "dtype=float32",  # the split alone may move the numbers: bf16 rounds each bucket's sums apart
        "reference=tiny",
        "loss_aggregation=seq_mean_token_mean",
        "policy_gradient=false",
        "terms=[{divergence: forward_kl, target: reference, coef: 1.0, prompt_positions: true}]",
    ]
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    completions = [[12], [13, 14, 15], [16, 17], [18, 19, 20, 21, 22], [23, 24], [25], [26, 27, 28], [29]]
    out = {}
    for micro in (4, 8):
        trainer = Trainer(tiny_cfg(tmp_path / str(micro), f"micro_batch_size={micro}", *extra), log=lambda *_: None)
        out[micro] = trainer._update(prompts, completions, [0.0] * 8, None)
    # float32 rounding only (a packed micro-batch's matmuls differ in shape with the split); the
    # micro-batch's own mean a_t moved the loss by percents
    assert out[4]["loss"] == pytest.approx(out[8]["loss"], rel=1e-5)
    assert out[4]["grad_norm"] == pytest.approx(out[8]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        ["kl_estimator=k3", "kl_coef=0.1"],
        ["kl_estimator=k1", "kl_in_reward=true", "kl_coef=0.1"],
        ["inner_iterations=2", "advantage=mean_only"],
    ],
)
def test_objective_variants_train(tmp_path, extra):
    cfg = tiny_cfg(tmp_path, "steps=1", *extra)
    trainer = Trainer(cfg, log=lambda *_: None)
    metrics = trainer.train_step(0)
    assert all(torch.isfinite(torch.tensor(float(metrics[k]))) for k in ("loss", "kl", "grad_norm"))


def test_checkpoint_round_trip_and_resume(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path), log=lambda *_: None)
    trainer.run()
    step, path = checkpoint_dirs(tmp_path / "run")[-1]
    assert step == 2
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for (name, a), b in zip(trainer.model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # Re-running into the same directory is refused unless resuming …
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(tiny_cfg(tmp_path, "steps=3"), log=lambda *_: None)
    # … and resuming continues from step 2 to step 3.
    _next_second()  # a later TensorBoard event file (named by the second)
    resumed = Trainer(tiny_cfg(tmp_path, "steps=3", "resume=true"), log=lambda *_: None)
    resumed.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
    # TensorBoard keeps the checkpoint step's events (step 2: kept in metrics.jsonl, not re-logged)
    events = _tensorboard(tmp_path / "run")
    assert [(e.step, e.value) for e in events.Scalars("reward")] == [
        (r["step"], r["reward"]) for r in rows if "reward" in r
    ]
    # the 2-step run's final evaluation (step 2) is gone from both, as from an uninterrupted 3-step run
    assert [r["step"] for r in rows if "eval_pass@1" in r] == [e.step for e in events.Scalars("eval_pass@1")] == [0, 3]


def test_interrupt_keeps_the_last_completed_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg(tmp_path, "steps=5"), log=lambda *_: None)
    real_step = trainer.train_step

    def interrupted(step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(step)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    step, path = checkpoint_dirs(tmp_path / "run")[-1]
    assert step == 2
    AutoModelForCausalLM.from_pretrained(path)  # loadable
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def _next_second() -> None:
    time.sleep(1 - time.time() % 1 + 0.01)


def _tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return events


def test_a_run_interrupted_in_its_final_evaluation_resumes_and_logs_it_once(tmp_path, monkeypatch):
    """The final checkpoint (step 3) is no refresh of the reference (every 2): a finished run reads
    no reference, so it resumes; resuming it again changes no row."""
    args = ("steps=3", "checkpoint_every=2", "reference_refresh_every=2", "kl_coef=0.1")
    real = Trainer.evaluate

    def evaluate(self):
        if self.step == 3:
            raise KeyboardInterrupt  # Ctrl-C during the final held-out evaluation
        return real(self)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_cfg(tmp_path, *args), log=said.append).run()
    assert said[-1].endswith("step-3; continue with --set resume=true")
    monkeypatch.setattr(Trainer, "evaluate", real)
    run = tmp_path / "run"
    _next_second()
    summary = Trainer(tiny_cfg(tmp_path, *args, "resume=true"), log=lambda *_: None).run()
    rows = read_metrics(run / "metrics.jsonl")
    assert [(r["step"], "eval_pass@1" in r) for r in rows] == [(0, True), (1, False), (2, False), (3, False), (3, True)]
    assert rows[-1]["eval_pass@1"] == summary["after"]["eval_pass@1"]
    _next_second()
    Trainer(tiny_cfg(tmp_path, *args, "resume=true"), log=lambda *_: None).run()
    assert read_metrics(run / "metrics.jsonl") == rows
    events = _tensorboard(run)
    assert [e.step for e in events.Scalars("eval_pass@1")] == [0, 3]
    assert [e.step for e in events.Scalars("reward")] == [1, 2, 3]


def test_a_two_stage_run_interrupted_before_its_checkpoints_resumes(tmp_path, monkeypatch, say_task):
    """Stopped in stage 1 before its first checkpoint, then in stage 2 before its first: each
    `resume=true` starts that stage over, and each stage's metrics hold every row once, the
    same numbers as the first attempt's."""
    args = erpd_args(tmp_path, say_task)
    real = Trainer.train_step
    stop_at: tuple[int, int] | None = (1, 1)  # (stage, step)

    def train_step(self, step):
        if (self.stage, step) == stop_at:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    stage1, stage2 = tmp_path / "run" / "stage1", tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(build_config(None, args, recipe="erpd"), log=lambda *_: None)
    first = read_metrics(stage1 / "metrics.jsonl")
    assert [r["step"] for r in first] == [0, 1] and not checkpoint_dirs(stage1)
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(build_config(None, args, recipe="erpd"), log=lambda *_: None)
    stop_at = (2, 0)
    trainer = Trainer(build_config(None, [*args, "resume=true"], recipe="erpd"), log=lambda *_: None)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    rows = read_metrics(stage1 / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 2]
    assert [_no_times(r) for r in rows[:2]] == [_no_times(r) for r in first]  # started over: the same numbers
    assert [r["step"] for r in read_metrics(stage2 / "metrics.jsonl")] == [0]
    stop_at = None
    Trainer(build_config(None, [*args, "resume=true"], recipe="erpd"), log=lambda *_: None).run()
    rows2 = read_metrics(stage2 / "metrics.jsonl")
    assert [(r["step"], "reward" in r) for r in rows2] == [(0, False), (1, True), (1, False)]
    assert [_no_times(r) for r in read_metrics(stage1 / "metrics.jsonl")] == [_no_times(r) for r in rows]


def _no_times(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time_")}


def test_failing_verifier_scores_zero_and_is_counted(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n" for i in range(12)))
    (tmp_path / "flaky_verifier.py").write_text(
        "calls = 0\n"
        "def score(completion, answer):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls % 2:\n"
        "        raise ValueError('verifier bug')\n"
        "    return 'not a number'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_cfg(tmp_path, f"task={data}", "verifier=flaky_verifier:score", "steps=1")
    Trainer(cfg, log=lambda *_: None).run()
    row = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r)
    assert row["reward_errors"] == 8 and row["reward"] == 0.0


def test_distillation_to_a_teacher_loads_only_the_models_its_terms_need(tmp_path):
    opd = Trainer(
        build_config(None, [*tiny_args(tmp_path), "steps=1", "teacher=tiny", "monitor_kl=false"], recipe="opd"),
        log=lambda *_: None,
    )
    assert opd.reference is None and opd.teacher is not None
    assert not any(p.requires_grad for p in opd.teacher.parameters())
    before = {k: v.detach().clone() for k, v in opd.model.named_parameters()}
    metrics = opd.train_step(0)
    assert "kl" not in metrics and "pg_loss" not in metrics
    assert metrics["reverse_kl_to_teacher"] > 0 and metrics["reverse_kl_to_teacher_share"] == 1.0
    assert metrics["loss"] == pytest.approx(metrics["reverse_kl_to_teacher"], rel=1e-5)  # token mean
    assert any(not torch.equal(v, before[k]) for k, v in opd.model.named_parameters())
    grpo = Trainer(tiny_cfg(tmp_path / "g", "steps=1"), log=lambda *_: None)
    assert grpo.teacher is None and grpo.reference is not None  # monitor_kl keeps the reference


def tiny_args(tmp_path):
    return [
        "model=tiny",
        "steps=2",
        f"output_dir={tmp_path / 'run'}",
        "prompts_per_step=2",
        "group_size=4",
        "max_new_tokens=6",
        "eval_size=4",
        "eval_samples=2",
        "train_size=50",
        "lr=1e-3",
        "checkpoint_every=1",
        "eval_every=0",
    ]


def test_a_composed_target_with_masks_trains_and_logs_each_term(tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        "steps=1",
        "teacher=tiny",
        "inner_iterations=2",
        "kl_coef=0.01",
        "kl_estimator=k2",
        "pg_weight={pass_rate: {a: 0, b: 0}}",
        "terms=[{divergence: jsd, params: {beta: 0.5}, coef: 0.1, "
        "target: {extrapolate: {ref: reference, teacher: teacher, lam: 1.5}}, "
        "mask: {entropy_quantile: {top: 0.5}}}, "
        "{divergence: forward_kl, coef: 0.1, target: {filter: {p: old, min_p: 0.001}}}]",
    )
    metrics = Trainer(cfg, log=lambda *_: None).train_step(0)
    for key in (
        "jsd_to_extrapolate",
        "jsd_to_extrapolate_share",
        "jsd_to_extrapolate_masked_fraction",
        "forward_kl_to_filter",
        "reverse_kl_to_reference",
        "kl",
        "pg_mean_weight",
        "grad_norm",
    ):
        assert math.isfinite(metrics[key]), key
    assert metrics["jsd_to_extrapolate_masked_fraction"] == pytest.approx(0.5, abs=0.1)
    assert sum(metrics[k] for k in metrics if k.endswith("_share")) == pytest.approx(1.0)


def test_teacher_with_another_vocabulary_is_refused(tmp_path, tiny):
    from transformers import LlamaForCausalLM

    from divrl.models import tiny_config

    _, tokenizer = tiny
    teacher_dir = tmp_path / "teacher"
    LlamaForCausalLM(tiny_config(len(tokenizer) + 64)).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    cfg = tiny_cfg(tmp_path, f"teacher={teacher_dir}", "terms=[{divergence: forward_kl, target: teacher}]")
    with pytest.raises(ConfigError, match=f"{len(tokenizer) + 64} tokens, the policy 'tiny' {len(tokenizer)}"):
        Trainer(cfg, log=lambda *_: None)


def test_gradient_checkpointing_that_drops_the_prompt_cache_is_caught(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")  # not packed: the KV-cache path
    model.activation_checkpointing_enable()
    model.train()
    try:
        with pytest.raises(RuntimeError, match="dropped its cache"):
            completion_hidden(model, [[1, 2, 3]], [[4, 5], [6]], tokenizer.pad_token_id)
    finally:
        model.activation_checkpointing_disable()
        model.eval()


def test_top_p_below_one_trains_against_the_samplers_own_logprobs(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "steps=1", "top_p=0.5", "temperature=0.05"), log=lambda *_: None)
    examples = trainer.prompts.batch(0, 2)
    rollout = trainer._sample(examples, 4, 0.05, torch.Generator().manual_seed(0))
    frozen = trainer._frozen_inputs(
        rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, None, trainer.online_spec, monitor_kl=True
    )
    expected = torch.tensor([lp for row in rollout.logprobs for lp in row])
    torch.testing.assert_close(frozen.old_logprobs, expected)
    metrics = trainer.train_step(0)
    assert math.isfinite(metrics["loss"])


def test_demonstrations_are_trained_on_policy_with_top_p_below_one(tmp_path):
    """Demonstrations have no sampler: their placeholder log-probs are never πold, so the PPO ratio
    is 1 (with πold = 0.0 it was ~e^-11 and the update nothing)."""
    offline = ("offline=true", "offline_data=demonstrations", "demonstrations_from=answers", "advantage=signed")
    trainer = Trainer(tiny_cfg(tmp_path, "steps=1", "top_p=0.9", "kl_coef=0", *offline), log=lambda *_: None)
    metrics = trainer.train_step(0)
    assert metrics["pg_loss"] == pytest.approx(-1.0, abs=1e-6)  # −A·ratio, A = 1, ratio 1
    assert metrics["clip_fraction"] == 0.0


def test_inner_iterations_take_old_logprobs_from_the_first_iteration(tmp_path, monkeypatch):
    """πold of iterations 2.. is the first iteration's πθ: no separate policy forward before the
    update (tests/test_golden_run.py's `inner2` case holds the metrics to the earlier numbers)."""
    import divrl.trainer as trainer_module

    trainer = Trainer(
        tiny_cfg(tmp_path, "inner_iterations=3", "micro_batch_size=4", "kl_coef=0.0", "monitor_kl=false"),
        log=lambda *_: None,
    )
    forwards = []

    def counted(model, *args, **kwargs):
        forwards.append(model is trainer.model)
        return completion_hidden(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "completion_hidden", counted)
    logprobs = []
    original = trainer_module.objectives.objective_loss

    def recorded(spec, inputs):
        logprobs.append((inputs.old_logprobs, original(spec, inputs)))
        return logprobs[-1][1]

    monkeypatch.setattr(trainer_module.objectives, "objective_loss", recorded)
    trainer.train_step(0)
    micro_batches = 2  # 2 prompts × 4 completions, 4 a micro-batch
    assert forwards == [True] * (3 * micro_batches)  # the policy, once per micro-batch and iteration
    first = [out.logprobs for old, out in logprobs[:micro_batches]]
    assert all(old is None for old, _ in logprobs[:micro_batches])
    for m, (old, _) in enumerate(logprobs[micro_batches:]):
        assert torch.equal(old, first[m % micro_batches])


@pytest.mark.parametrize(
    "objective, logged",
    [
        ("kl_coef=0.0", [1, 3]),  # no term reads the reference
        ("terms=[{divergence: forward_kl, target: reference, coef: 0.1}]", [1, 3]),  # one reads it, not for `kl`
        ("kl_coef=0.1", [1, 2, 3, 4]),  # the reverse-KL term computes `kl` anyway
    ],
)
def test_kl_is_monitored_every_few_steps_unless_a_term_computes_it(tmp_path, objective, logged):
    """The reference forward and the divergence pass that only log `kl` run on the first step and
    every monitor_kl_every-th; a reverse-KL-to-reference term gives it every step."""
    trainer = Trainer(tiny_cfg(tmp_path, "steps=4", objective, "monitor_kl_every=3"), log=lambda *_: None)
    rows = [dict(step=s + 1, **trainer.train_step(s)) for s in range(4)]
    assert [r["step"] for r in rows if "kl" in r] == logged
    assert all(r["kl"] >= -1e-6 for r in rows if "kl" in r)  # exact KL, up to rounding at step 1


@pytest.mark.parametrize("attention_dtype", ["float32", "bfloat16"])
def test_bf16_run_stores_the_reference_in_bf16_and_its_kl_starts_at_exactly_zero(tmp_path, attention_dtype):
    """At bf16 the frozen reference's linears are stored in bf16 (`frozen_for`), the rounding
    autocast gives the policy's float32 weights at each forward; the attention computes in
    `attention_dtype` in both models. Policy and reference then compute the same numbers at step
    1: KL exactly 0."""
    trainer = Trainer(
        tiny_cfg(tmp_path, "kl_coef=0.1", "dtype=bfloat16", f"attention_dtype={attention_dtype}", "steps=1"),
        log=lambda *_: None,
    )
    reference, policy = trainer.reference, trainer.model
    assert reference is not None and trainer.precision == "bf16"
    assert {p.dtype for n, p in reference.named_parameters() if "proj" in n} == {torch.bfloat16}
    assert reference.get_input_embeddings().weight.dtype == torch.float32
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    expected = attention.FLOAT32_SDPA if attention_dtype == "float32" else attention.SDPA
    assert policy.config._attn_implementation == reference.config._attn_implementation == expected
    trainer.run()
    (step,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert step["kl"] == 0.0


def test_float32_precision_keeps_the_reference_and_the_attention_float32(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "kl_coef=0.1", "dtype=float32"), log=lambda *_: None)
    assert trainer.attention_dtype == "float32" and trainer.reference is not None
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.float32}
    assert trainer.model.config._attn_implementation == attention.SDPA  # float32 already: SDPA as it is


def test_the_fused_adamw_steps_as_the_per_tensor_loop_does(tmp_path):
    """The trainer's AdamW is torch's fused kernel on the CPU; its step is the per-tensor loop's
    (the same hyperparameters) to float32 rounding."""
    trainer = Trainer(tiny_cfg(tmp_path, "weight_decay=0.1"), log=lambda *_: None)
    fused = trainer.optimizer
    assert fused.defaults["fused"] is True
    params = [p for group in fused.param_groups for p in group["params"]]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loop = torch.optim.AdamW(copies, lr=fused.defaults["lr"], weight_decay=0.1, foreach=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
