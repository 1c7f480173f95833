import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from divrl import chunked
from divrl.checkpoint import checkpoint_dirs
from divrl.config import ConfigError, build_config
from divrl.runlog import read_metrics
from divrl.trainer import Trainer, completion_hidden, output_weight


def tiny_cfg(tmp_path, *extra):
    return build_config(None, ["model=tiny", "steps=2", f"output_dir={tmp_path / 'run'}",
                               "prompts_per_step=2", "group_size=4", "max_new_tokens=6",
                               "eval_size=4", "eval_samples=2", "train_size=50", "lr=1e-3",
                               "checkpoint_every=1", "eval_every=0", *extra])


def test_two_steps_change_the_weights_and_write_the_run(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "kl_coef=0.1"), log=lambda *_: None)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    summary = trainer.run()
    changed = [k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])]
    assert changed, "no parameter moved"
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
        batch = completion_hidden(model, [[1, 2, 3], [7, 8]], [[4, 5, 6], [9], [10, 11], [12]],
                                  tokenizer.pad_token_id)
        kl = chunked.divergence("reverse_kl", batch.hidden, output_weight(model),
                                batch.hidden, output_weight(model))
    assert kl.shape == (7,)
    torch.testing.assert_close(kl, torch.zeros(7), atol=1e-6, rtol=0)


def test_shared_prompt_forward_matches_full_sequences(tiny):
    """Prompt computed once + KV repeated G times == each prompt+completion run on its own,
    for log-probs and their gradients (prompts of different lengths, ragged completions)."""
    model, tokenizer = tiny
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, 11, 12], [13], [14, 15], [16, 17, 18]]  # G = 2, group-major
    weight = output_weight(model)
    batch = completion_hidden(model, prompts, completions, tokenizer.pad_token_id)
    lp, _ = chunked.logprob_entropy(batch.hidden, weight, batch.tokens)
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


@pytest.mark.parametrize("extra", [["kl_estimator=k3", "kl_coef=0.1"],
                                   ["kl_estimator=k1", "kl_in_reward=true", "kl_coef=0.1"],
                                   ["inner_iterations=2", "advantage=mean_only"]])
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
    resumed = Trainer(tiny_cfg(tmp_path, "steps=3", "resume=true"), log=lambda *_: None)
    resumed.run()
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert steps == [1, 2, 3]


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


def test_failing_verifier_scores_zero_and_is_counted(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n"
                            for i in range(12)))
    (tmp_path / "flaky_verifier.py").write_text(
        "calls = 0\n"
        "def score(completion, answer):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls % 2:\n"
        "        raise ValueError('verifier bug')\n"
        "    return 'not a number'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_cfg(tmp_path, f"task={data}", "verifier=flaky_verifier:score", "steps=1")
    Trainer(cfg, log=lambda *_: None).run()
    row = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r][0]
    assert row["reward_errors"] == 8 and row["reward"] == 0.0
