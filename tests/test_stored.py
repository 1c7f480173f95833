"""DPH-RL's stored responses: the stored-sample estimator is unbiased for the f-divergence (value
and gradient, by enumeration), DPH-F/JS forms, and the rehearsal set in a run: sampled once,
split by pass rate, solved prompts out of the policy-gradient pool, reused on resume."""

import pytest
import torch

from divrl import objectives, stored
from divrl.config import build_config
from divrl.runlog import read_metrics
from divrl.trainer import Trainer


@pytest.mark.parametrize(
    "name, params",
    [("forward_kl", {}), ("jsd", {"beta": 0.5}), ("chi2", {}), ("reverse_kl", {}), ("alpha", {"alpha": 0.3})],
)
def test_stored_estimate_is_unbiased_under_the_target(name, params):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, dtype=torch.float64, generator=gen).requires_grad_()
    lq = torch.randn(6, dtype=torch.float64, generator=gen).log_softmax(-1)
    lp = logits.log_softmax(-1)
    every_token = objectives.stored_estimate(name, params, lp, lq)  # y = each token, weighted by q(y)
    expected = objectives.divergences.get(name)(lp, lq, **params)
    value = (lq.exp() * every_token).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    grads = [torch.autograd.grad(v, logits, retain_graph=True)[0] for v in (value, expected)]
    torch.testing.assert_close(grads[0], grads[1])
    assert (every_token.detach() >= -1e-12).all()  # the control variate keeps each sample ≥ 0


def test_dph_forms():
    lp, lq = torch.log(torch.tensor([0.3, 0.05])), torch.log(torch.tensor([0.1, 0.4]))
    u = (lp - lq).exp()
    torch.testing.assert_close(objectives.stored_estimate("forward_kl", {}, lp, lq), u - 1 - u.log())
    js = u * u.log() - (u + 1) * ((u + 1) / 2).log()  # DPH-JS generator
    torch.testing.assert_close(2 * objectives.stored_estimate("jsd", {"beta": 0.5}, lp, lq), js)


def test_the_rehearsal_set_is_sampled_once_split_and_reused(tmp_path, say_task):
    args = [
        "model=tiny",
        "prompts_per_step=2",
        "group_size=2",
        "max_new_tokens=4",
        "eval_size=4",
        "eval_samples=1",
        "checkpoint_every=1",
        "eval_every=0",
        *say_task(range(30), "even_solved"),
        "stored_prompts=10",
        "stored_samples=2",
        "stored_per_step=2",
        "monitor_kl=false",
        f"output_dir={tmp_path / 'run'}",
    ]
    trainer = Trainer(build_config(None, [*args, "steps=1"], recipe="dph-rl"), log=lambda *_: None)
    solved = {trainer.task.train[g.index].answer for g in trainer.stored_groups}
    assert solved and all(int(a) % 2 == 0 for a in solved)  # the initial policy "solves" even answers
    assert not solved & {e.answer for e in trainer.prompts.examples}  # no longer PG prompts
    assert trainer.reference is None  # the stored log-probs replace an online reference model
    saved = (tmp_path / "run" / stored.FILENAME).read_text()
    trainer.run()
    (row,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert row["forward_kl_to_reference_stored"] >= 0 and 0 < row["forward_kl_to_reference_stored_share"] <= 1
    resumed = Trainer(build_config(None, [*args, "steps=2", "resume=true"], recipe="dph-rl"), log=lambda *_: None)
    assert (tmp_path / "run" / stored.FILENAME).read_text() == saved
    assert [g.index for g in resumed.stored_groups] == [g.index for g in trainer.stored_groups]


def test_stored_terms_are_validated():
    with pytest.raises(Exception, match="its target is reference"):
        build_config(None, ["teacher=tiny", "terms=[{divergence: forward_kl, target: teacher, estimator: stored}]"])
    with pytest.raises(Exception, match="'stored_solved' must be in \\(0, 1\\]"):
        build_config(None, ["stored_solved=0"], recipe="dph-rl")


def test_a_rehearsal_set_that_leaves_no_policy_gradient_prompt_is_refused(tmp_path, say_task):
    cfg = build_config(
        None,
        [
            "model=tiny",
            "eval_size=4",
            "max_new_tokens=4",
            *say_task(range(0, 24, 2), "even_solved"),
            "stored_samples=2",
            f"output_dir={tmp_path / 'run'}",
        ],
        recipe="dph-rl",
    )
    with pytest.raises(Exception, match="none is left for the policy gradient"):
        Trainer(cfg, log=lambda *_: None)


def _group(index, rewards, lengths):
    return stored.StoredGroup(index, [[7] * n for n in lengths], [[-0.5] * n for n in lengths], rewards)


def test_offline_selection_keeps_mixed_prompts_closest_to_half_and_their_shortest_responses():
    groups = [
        _group(0, [1, 1, 1, 1, 1], [1, 2, 3, 4, 5]),  # all pass: dropped
        _group(1, [1, 0, 0, 0, 0], [5, 4, 3, 2, 1]),  # p̂ 0.2
        _group(2, [1, 1, 0, 0, 0], [2, 9, 1, 3, 3]),  # p̂ 0.4
        _group(3, [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]),  # all fail: dropped
        _group(4, [1, 1, 1, 0, 1], [1, 2, 3, 4, 5]),
    ]  # p̂ 0.8
    kept = stored.select_offline(groups, keep=2, shortest=0.8, pass_threshold=1.0)
    assert [g.index for g in kept] == [1, 2]  # |p̂ − 0.5| = 0.3, 0.1 beat 0.3 of prompt 4 by order
    assert stored.kept_per_prompt(5, 0.8) == 4 and stored.kept_per_prompt(20, 0.8) == 16
    assert [len(c) for c in kept[0].completions] == [4, 3, 2, 1] and kept[0].rewards == [0, 0, 0, 0]
    assert [len(c) for c in kept[1].completions] == [2, 1, 3, 3] and kept[1].rewards == [1, 0, 0, 0]
    assert [g.index for g in stored.select_offline(groups, 0, 1.0, 1.0)] == [1, 2, 4]


def _offline_args(tmp_path, say_task) -> list[str]:
    """A tiny offline run's overrides: 6 stored prompts × 5 responses scored by length parity."""
    return [
        "model=tiny",
        *say_task(range(30), "parity"),
        "prompts_per_step=2",
        "max_new_tokens=6",
        "eval_size=2",
        "eval_samples=1",
        "stored_prompts=6",
        "stored_samples=5",
        "offline_keep=3",
        f"output_dir={tmp_path / 'run'}",
    ]


def test_an_offline_run_trains_on_the_stored_set_without_generating(tmp_path, say_task, monkeypatch):
    args = _offline_args(tmp_path, say_task)
    trainer = Trainer(build_config(None, [*args, "steps=2"], recipe="reasonmaxxer"), log=lambda *_: None)
    assert 1 <= len(trainer.offline_groups) <= 3
    assert all(len(g.completions) == 4 for g in trainer.offline_groups)  # the shortest 80% of 5
    before = [p.detach().clone() for p in trainer.model.parameters()]

    def no_generation(*_, **__):
        raise AssertionError("an offline step generated")

    monkeypatch.setattr(trainer, "_sample", no_generation)
    row = trainer.train_step(0)
    assert 0 <= row["pg_masked_fraction"] <= 1 and row["forward_kl_to_reference"] >= 0
    assert row["reward"] == pytest.approx(sum(r for g in trainer.offline_groups[:2] for r in g.rewards) / 8)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


def test_offline_keys_are_validated():
    with pytest.raises(Exception, match="'offline_shortest' must be in \\(0, 1\\]"):
        build_config(None, ["offline_shortest=0"], recipe="reasonmaxxer")
    with pytest.raises(Exception, match="'micro_batch_size' must be ≥ the 16 responses"):
        build_config(None, ["micro_batch_size=8"], recipe="reasonmaxxer")
    with pytest.raises(Exception, match="'dynamic_sampling' has nothing to refill offline"):
        build_config(None, ["dynamic_sampling=true"], recipe="reasonmaxxer")
    with pytest.raises(Exception, match=r"reference_entropy_above: .*threshold must lie in"):
        build_config(None, ["pg_mask={reference_entropy_above: {threshold: -1}}"], recipe="reasonmaxxer")


def test_an_offline_run_with_a_reward_placed_term_computes_the_policy_for_it(tmp_path, say_task):
    # the stored sampler's log-probs are πold, but the reward-placed KL is still evaluated on a
    # forward of the policy (it used to be skipped, and the penalty read None)
    args = [
        *_offline_args(tmp_path, say_task),
        "offline=true",
        "offline_data=stored",
        "kl_in_reward=true",
        "kl_estimator=k1",
        "kl_coef=0.05",
        "steps=1",
    ]
    trainer = Trainer(build_config(None, args, recipe="grpo"), log=lambda *_: None)
    row = trainer.train_step(0)
    assert torch.isfinite(torch.tensor(row["loss"])) and row["reverse_kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
