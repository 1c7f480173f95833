"""DAPO's pieces: dynamic sampling (drop equal-reward groups, refill with fresh prompts, capped and
logged) through the pluggable PromptSource, and the soft overlong penalty."""

import pytest
import torch

from divrl import objectives
from divrl.config import build_config
from divrl.prompts import PromptSource
from divrl.spec import parse_objective
from divrl.tasks import Example
from divrl.trainer import Trainer

VERIFIER = """
def half_informative(completion, answer):
    # even answers: every sample scores 0 (a group with nothing to learn); odd: a varied score
    if int(answer) % 2 == 0:
        return 0.0
    text = completion.lower()
    return sum(c in "aeiou" for c in text) / max(1, len(text))

def never(completion, answer):
    return 0.0
"""


def _cfg(tmp_path, say_task, verifier, *extra):
    return build_config(
        None,
        [
            "model=tiny",
            "steps=1",
            f"output_dir={tmp_path / 'run'}",
            "prompts_per_step=4",
            "group_size=4",
            "max_new_tokens=6",
            "eval_size=4",
            "eval_samples=1",
            *say_task(range(40), verifier, VERIFIER),
            "eval_every=0",
            *extra,
        ],
        recipe="dapo",
    )


def test_uninformative_groups_are_dropped_and_refilled(tmp_path, say_task, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, say_task, "half_informative"), log=lambda *_: None)
    trained = []
    real_update = trainer._update

    def spy(prompts, completions, rewards, logprobs, *stored_groups, **options):
        trained.append(rewards)
        return real_update(prompts, completions, rewards, logprobs, *stored_groups, **options)

    monkeypatch.setattr(trainer, "_update", spy)
    metrics = trainer.train_step(0)
    (rewards,) = trained
    groups = [rewards[i : i + 4] for i in range(0, len(rewards), 4)]
    assert len(groups) == metrics["trained_groups"] == 4
    assert all(max(g) > min(g) for g in groups)  # only groups with something to learn
    assert metrics["refills"] >= 1 and metrics["dropped_groups"] >= 1
    assert metrics["overlong_penalty"] <= 0 and "loss" in metrics


def test_the_refill_cap_holds_and_a_step_without_signal_skips_the_update(tmp_path, say_task):
    trainer = Trainer(_cfg(tmp_path, say_task, "never", "max_refills=2"), log=lambda *_: None)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    metrics = trainer.train_step(0)
    assert (metrics["refills"], metrics["trained_groups"]) == (2, 0)
    assert metrics["dropped_groups"] == 4 * 3  # the batch and two refills, all equal rewards
    assert "loss" not in metrics
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.named_parameters())


def test_refills_are_deterministic_and_fresh_per_round():
    source = PromptSource([Example(f"p{i}", str(i), {}) for i in range(50)], seed=3)
    assert source.refill(7, 1, 5) == source.refill(7, 1, 5)
    assert source.refill(7, 1, 5) != source.refill(7, 2, 5)
    assert len({e.prompt for e in source.refill(7, 1, 5)}) == 5
    assert source.batch(2, 4) == PromptSource(source.examples, seed=3).batch(2, 4)


def test_overlong_penalty_is_zero_then_linear_to_its_maximum():
    spec = build_config(None, ["max_new_tokens=10", "overlong_buffer=0.2", "overlong_penalty=0.5"]).objective
    got = objectives.overlong_penalty(spec, torch.tensor([3, 8, 9, 10]))
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.5]))
    off = build_config(None, ["max_new_tokens=10"]).objective
    assert objectives.overlong_penalty(off, torch.tensor([10])).item() == 0.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("overlong_buffer=1.5", "overlong_buffer: must lie in [0, 1]"),
        ("overlong_penalty=-1", "overlong_penalty: must be a finite number ≥ 0"),
        ("max_refills=-1", "'max_refills' must be ≥ 0"),
    ],
)
def test_bad_dapo_settings_are_refused(override, message):
    with pytest.raises(Exception) as err:
        build_config(None, [override], recipe="dapo")
    assert message in str(err.value)


def test_signed_advantages_read_the_verdict_not_the_shaped_reward():
    """A passing completion that ran into the overlong zone keeps its +1 under PSR/NSR (the config
    refuses this pairing, since the shaping then does nothing; the spec below is built directly)."""
    spec = parse_objective({"advantage": "signed", "max_new_tokens": 10, "overlong_buffer": 0.2})
    task = torch.tensor([1.0, 0.0])
    shaped = task + objectives.overlong_penalty(spec, torch.tensor([10, 3]))
    assert shaped[0] < 1.0
    got = objectives.advantages(spec, shaped, None, 2, verdict=objectives.passed(task))
    torch.testing.assert_close(got, torch.tensor([1.0, -1.0]))
