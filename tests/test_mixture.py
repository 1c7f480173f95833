"""Task mixtures (divrl.mixture): the per-step shares, each member's prompt stream, scoring by the
member's own verifier, per-task metrics, and the config errors naming the key."""

import pytest

from cli_args import TINY_RUN
from divrl.config import ConfigError, build_config
from divrl.mixture import MixtureSource, MixtureTask, allocate
from divrl.prompts import PromptSource
from divrl.report import _eval_table
from divrl.tasks import Example, build_task
from divrl.trainer import Trainer


def test_allocate_gives_floor_or_ceil_of_each_share_with_the_exact_expectation():
    weights, size = [0.7, 0.2, 0.1], 4  # shares 2.8, 0.8, 0.4
    draws = [allocate(weights, size, f"0:mixture:{step}:0") for step in range(4000)]
    assert all(sum(d) == size for d in draws)
    assert {d[0] for d in draws} == {2, 3} and {d[1] for d in draws} <= {0, 1} and {d[2] for d in draws} <= {0, 1}
    means = [sum(d[k] for d in draws) / len(draws) for k in range(3)]
    assert means == pytest.approx([2.8, 0.8, 0.4], abs=0.03)
    assert allocate(weights, size, "x") == allocate(weights, size, "x")  # seeded
    assert allocate([3.0, 1.0], 8, "y") == [6, 2]  # exact shares need no rounding


def _source(weights=(0.75, 0.25), sizes=(6, 5)):
    members = {
        name: PromptSource([Example(f"{name}{i}", str(i), task=name) for i in range(n)], seed=k)
        for k, (name, n) in enumerate(zip("ab", sizes))
    }
    return MixtureSource(members, dict(zip("ab", weights)), seed=3)


def test_each_member_stream_advances_by_its_share_and_covers_its_epoch():
    source = _source()
    batches = [source.batch(step, 4) for step in range(12)]
    assert all(len(b) == 4 for b in batches)
    a = [e.prompt for b in batches for e in b if e.task == "a"]
    assert 30 <= len(a) <= 42  # 3 per step on average: 36
    assert sorted(a[:6]) == sorted(f"a{i}" for i in range(6))  # the first epoch, no repeat or skip
    assert sorted(a[6:12]) == sorted(f"a{i}" for i in range(6))
    # a fresh source (a resumed run) repeats any step without replaying the earlier ones
    assert _source().batch(7, 4) == batches[7]
    refill = source.refill(2, 1, 3)
    assert len(refill) == 3 and refill == _source().refill(2, 1, 3)


def test_members_are_scored_by_their_own_verifier_and_reported_per_task(tmp_path, say_task):
    """chain_sum (the untrained tiny model scores 0) beside a JSONL task whose verifier passes
    everything: reward/say = 1, reward/chain_sum = 0, and the same split at evaluation."""
    data = say_task(range(24), "always")[0].removeprefix("task=")
    cfg = build_config(
        None,
        [
            *TINY_RUN,
            "task=mixture",
            f"mixture=[{{task: chain_sum, weight: 1}}, {{task: '{data}', verifier: 'always_verifier:always', weight: 1, name: say}}]",
            "prompts_per_step=4",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    task = build_task(cfg)
    assert isinstance(task, MixtureTask) and list(task.members) == ["chain_sum", "say"]
    assert {e.task for e in task.train} == {"chain_sum", "say"} and len(task.eval) == 4
    chain = next(e for e in task.train if e.task == "chain_sum")
    assert task.score(f"The answer is {chain.answer}.", chain) == 1.0 and task.score("no", chain) == 0.0
    trainer = Trainer(cfg, log=lambda *_: None)
    stats = trainer.train_step(0)
    assert stats["reward/say"] == stats["pass_rate/say"] == 1.0 and stats["reward/chain_sum"] == 0.0
    assert stats["reward"] == 0.5  # 2 prompts of each (equal weights, 4 per step)
    assert not any(key.startswith("recap_weight/") for key in stats)
    evaluation = trainer.evaluate()
    assert evaluation["eval_pass@1/say"] == 1.0 and evaluation["eval_pass@1/chain_sum"] == 0.0
    assert evaluation["eval_pass@1_se/say"] == 0.0 and evaluation["eval_pass@1"] == 0.5
    assert "| pass@1/say | 1.000 ± 0.000 | 1.000 ± 0.000 | +0.000 |" in _eval_table(evaluation, evaluation)


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (["task=mixture"], "mixture", "must list the tasks of task: mixture"),
        (["mixture=[{task: chain_sum}]"], "task", "must be 'mixture' when 'mixture' lists tasks"),
        (
            ["task=mixture", "mixture=[{task: chain_sum}, {task: chain_summ}]"],
            "mixture[1].task",
            "unknown task 'chain_summ'",
        ),
        (["task=mixture", "mixture=[{task: nowhere.jsonl}]"], "mixture[0].task", "'nowhere.jsonl' does not exist"),
        (
            ["task=mixture", "mixture=[{task: chain_sum, weight: 0}]"],
            "mixture[0].weight",
            "must be a finite number > 0",
        ),
        (
            ["task=mixture", "mixture=[{task: chain_sum, weight: -1}]"],
            "mixture[0].weight",
            "must be a finite number > 0",
        ),
        (["task=mixture", "mixture=[{task: chain_sum, params: 3}]"], "mixture[0].params", "must be a mapping"),
        (["task=mixture", "mixture=[{task: chain_sum, wieght: 1}]"], "mixture[0]", "unknown keys ['wieght']"),
        (["task=mixture", "mixture=[{task: chain_sum}, {task: chain_sum}]"], "mixture[1].name", "names two members"),
        (["task=mixture", "mixture=[chain_sum]"], "mixture[0]", "must be a mapping with a 'task'"),
    ],
)
def test_bad_mixtures_are_refused_naming_the_key(overrides, key, message):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides)
    assert f"config key '{key}'" in str(err.value) and message in str(err.value)
