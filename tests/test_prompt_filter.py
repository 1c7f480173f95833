"""SELF's prompt filter: the current policy answers each prompt once greedily, and only the prompts
it gets wrong are sampled and trained on; a step whose prompts are all solved is skipped."""

from cli_args import TINY_RUN
from divrl.config import build_config
from divrl.trainer import Trainer


def _trainer(tmp_path, say_task, answers, *overrides):
    args = [
        *TINY_RUN,
        "prompts_per_step=4",
        *say_task(answers, "even_solved"),
        f"output_dir={tmp_path / 'run'}",
        *overrides,
    ]
    return Trainer(build_config(None, args, recipe="self"), log=lambda *_: None)


def test_greedy_unsolved_trains_only_the_prompts_the_greedy_answer_gets_wrong(tmp_path, say_task, monkeypatch):
    trainer = _trainer(tmp_path, say_task, range(30))
    calls = []
    sample = trainer._sample
    monkeypatch.setattr(
        trainer,
        "_sample",
        lambda ex, g, t, gen, *a, **k: calls.append((len(ex), g, t)) or sample(ex, g, t, gen, *a, **k),
    )
    offered = trainer.prompts.batch(0, 4)
    groups, stats = trainer._collect(0)
    odd = [e for e in offered if int(e.answer) % 2]
    assert [g.example for g in groups] == odd
    assert calls[0] == (4, 1, 0.0)  # one greedy answer per offered prompt
    assert calls[1] == (len(odd), 2, 1.0)  # then G samples of the unsolved ones, at T = 1
    assert stats["filtered_prompts"] == 4 - len(odd) and stats["trained_prompts"] == len(odd)
    assert stats["pass_rate"] == 0.0


def test_a_step_whose_prompts_are_all_solved_is_skipped(tmp_path, say_task):
    trainer = _trainer(tmp_path, say_task, [2 * i for i in range(30)], "steps=1")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    row = trainer.train_step(0)
    assert row["filtered_prompts"] == 4 and row["trained_prompts"] == 0
    assert all((a == p).all() for a, p in zip(before, trainer.model.parameters()))


def test_an_unknown_prompt_filter_is_refused_with_the_valid_ones():
    import pytest

    with pytest.raises(Exception, match="'prompt_filter' must be one of \\('none', 'greedy_unsolved'\\)"):
        build_config(None, ["prompt_filter=greedy"])
