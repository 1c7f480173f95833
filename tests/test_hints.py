"""KnowRL: the knowledge-point subset search on hand-written pass-rate tables (the pruning
interaction paradox included), where KPs come from and how they enter the prompt, and in the
trainer the search batched over a step's prompts, its selection trained on and kept."""

import json
from collections import Counter

import pytest
import reasoning_gym

from divrl.config import ConfigError, build_config
from divrl.hints import chain_steps, hinted_prompt, knowledge_points, subset_search
from divrl.tasks import ANSWER_INSTRUCTION, Example, encode_prompt
from divrl.trainer import Trainer


def _search(n, table, joint_evaluations=8):
    """(selection, every subset evaluated in order), pass rates read from `table` (0 if absent)."""
    search, asked = subset_search(n, joint_evaluations), []
    request = next(search)
    while True:
        asked += request
        try:
            request = search.send([table.get(s, 0.0) for s in request])
        except StopIteration as done:
            return done.value, asked


LOO = [(1, 2), (0, 2), (0, 1)]  # K ∖ {0}, K ∖ {1}, K ∖ {2} of K = (0, 1, 2)


def test_a_prompt_solved_without_hints_gets_none_and_one_nobody_solves_gets_all():
    assert _search(3, {(): 0.25, (0, 1, 2): 0.5}) == ((), [(), (0, 1, 2)])
    assert _search(3, {}) == ((0, 1, 2), [(), (0, 1, 2)])  # p(∅) = p(K) = 0: nothing shown to help
    assert _search(1, {(0,): 0.5}) == ((0,), [(), (0,)])  # leaving the one KP out is ∅, already failed
    assert _search(0, {}) == ((), [()])


def test_pruning_interaction_paradox_each_removal_helps_alone_but_not_together():
    # p(K) = 0.5; leave-one-out 0.5, 0.25, 0.75 → C = {0, 2}; jointly K ∖ {0, 2} = (1,) scores 0.25
    table = {(0, 1, 2): 0.5, (1, 2): 0.5, (0, 2): 0.25, (0, 1): 0.75, (1,): 0.25}
    selected, asked = _search(3, table)
    assert asked == [(), (0, 1, 2), *LOO, (1,)]
    assert selected == (0, 1)  # the joint removal failed: the best single removal, KP 2
    table[(1,)] = 0.5  # now the joint removal keeps p(K): the smallest sufficient set
    assert _search(3, table) == ((1,), [(), (0, 1, 2), *LOO, (1,)])


def test_no_removable_kp_keeps_all_and_the_joint_budget_caps_the_search():
    assert _search(3, {(0, 1, 2): 0.5, (1, 2): 0.25})[0] == (0, 1, 2)
    full = (0, 1, 2, 3)
    table = {full: 0.5, (1, 2, 3): 0.5, (0, 2, 3): 0.5, (0, 1, 3): 0.75, (0, 1, 2): 0.5}
    selected, asked = _search(4, table, joint_evaluations=2)
    # C = all four: R = K would leave ∅, known to fail (p(∅) = 0), so not asked again; R = {0, 1, 2}
    # (→ (3,)), then {0, 1, 3} (→ (2,)), both below p(K); budget spent
    assert asked[6:] == [(3,), (2,)]
    assert selected == (0, 1, 3)  # the best single removal (KP 2: 0.75)


def test_knowledge_points_are_the_rows_hints_or_chain_sum_partial_sums_without_the_answer():
    assert chain_steps("0 - 4 - 8 - 7", "-19") == ["0 - 4 = -4", "-4 - 8 = -12"]
    assert chain_steps("2 + 3 - 5 + 0", "0") == ["2 + 3 = 5"]  # 5 − 5 = 0 states the answer: dropped
    assert chain_steps("3 + 5", "8") == [] and chain_steps("x + 1 - 2", "0") == []
    assert knowledge_points(Example("q", "1", {"hints": [" a ", "b"]})) == ["a", "b"]
    assert knowledge_points(Example("q", "1", {})) == []
    with pytest.raises(ValueError, match="'hints' must be a list of non-empty strings"):
        knowledge_points(Example("q", "1", {"hints": "a"}))
    entry = next(iter(reasoning_gym.create_dataset("chain_sum", size=1, seed=0, min_terms=4, max_terms=4)))
    kps = knowledge_points(Example(entry["question"], entry["answer"], entry))
    assert len(kps) == 2 and all(entry["answer"] not in kp.split(" = ")[1:] for kp in kps)


def test_hints_follow_the_problem_in_a_numbered_section_before_the_answer_instruction():
    assert hinted_prompt("What is 1 + 2 + 3 =", ["1 + 2 = 3"]) == "What is 1 + 2 + 3 =\n\n## Hint\n1. 1 + 2 = 3"
    prompt = f"Sort 3, 1.\n\n{ANSWER_INSTRUCTION}"
    assert hinted_prompt(prompt, ["a", "b"]) == f"Sort 3, 1.\n\n## Hint\n1. a\n2. b\n\n{ANSWER_INSTRUCTION}"
    assert hinted_prompt(prompt, []) == prompt


@pytest.mark.parametrize(
    "value, message",
    [("{joint_evaluations: -1}", "joint_evaluations must be an integer ≥ 0"), ("{budget: 3}", "unknown field")],
)
def test_a_bad_knowledge_hints_is_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=f"'knowledge_hints': .*{message}"):
        build_config(None, [f"knowledge_hints={value}"])
    with pytest.raises(ConfigError, match="'knowledge_hints' cannot be combined with prefix_replay"):
        build_config(None, ["knowledge_hints={}", "prefix_replay={}"])


KPS = ["alpha", "beta", "gamma"]
SUFFICIENT = [{"alpha", "beta", "gamma"}, {"beta", "gamma"}, {"alpha", "beta"}]  # the paradox's table


def _args(tmp_path):
    return [
        "model=tiny",
        "steps=1",
        "prompts_per_step=2",
        "group_size=2",
        "max_new_tokens=3",
        "eval_size=2",
        "eval_samples=1",
        f"task={tmp_path / 'hints.jsonl'}",
        f"output_dir={tmp_path / 'run'}",
    ]


def _trainer(tmp_path, rows):
    (tmp_path / "hints.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Trainer(build_config(None, _args(tmp_path), recipe="knowrl"), log=lambda *_: None)


def test_the_trainer_searches_each_new_prompt_in_batched_rounds_and_trains_on_its_selection(tmp_path):
    trainer = _trainer(tmp_path, [{"prompt": f"Say {a}", "answer": str(a), "hints": KPS} for a in range(8)])

    def score(examples, completions, g):  # a hinted prompt passes (1 of 2) iff its KPs are sufficient
        shown = [{kp for kp in KPS if f". {kp}" in e.prompt} for e in examples]
        return [r for s in shown for r in ([1.0, 0.0] if s in SUFFICIENT else [0.0, 0.0])], Counter()

    trainer._score = score
    rounds = []
    sample = trainer._sample
    trainer._sample = lambda examples, *a, **k: rounds.append(len(examples)) or sample(examples, *a, **k)
    groups, stats = trainer._collect(0)
    assert rounds == [4, 6, 2]  # (∅, K), three leave-one-out, one joint removal — for both prompts at once
    assert [g.hints for g in groups] == [(1, 2), (1, 2)]  # joint {0, 2} fails: drop the first best, KP 0
    hinted = hinted_prompt(groups[0].example.prompt, ["beta", "gamma"])
    assert groups[0].prompt_ids == encode_prompt(trainer.tokenizer, hinted, None)  # the update's prompt
    assert groups[0].rewards == [1.0, 0.0]
    assert stats["hints_per_prompt"] == 2 and stats["hinted_groups"] == 1 and stats["knowledge_points"] == 3
    assert stats["pass_rate_without_hints"] == 0 and stats["pass_rate_with_hints"] == pytest.approx(3 / 10)
    assert stats["hint_search_groups"] == 10 and stats["hint_selections"] == 2
    assert stats["pass_rate"] == 0.5  # the trained groups'
    rounds.clear()
    again, sampled, _ = trainer._hinted_groups([g.example for g in groups])  # kept: no second search
    assert rounds == [2] and sampled == again and [g.hints for g in again] == [(1, 2), (1, 2)]
    state = trainer._trainer_state({})["hint_selections"]
    assert state == {g.example.prompt: [1, 2] for g in groups}


def test_malformed_hints_are_refused_before_training(tmp_path):
    rows = [{"prompt": f"Say {a}", "answer": str(a), "hints": ["ok", ""]} for a in range(6)]
    with pytest.raises(ConfigError, match=r"'knowledge_hints': the training prompt 'Say .*non-empty strings"):
        _trainer(tmp_path, rows)


def test_a_resumed_run_keeps_the_selections(tmp_path):
    rows = [{"prompt": f"Say {a}", "answer": str(a), "hints": KPS[:2]} for a in range(8)]
    trainer = _trainer(tmp_path, rows)
    trainer.run()
    assert len(trainer.hint_choice) >= 2  # dynamic sampling refills with fresh prompts: searched too
    resumed = Trainer(build_config(None, [*_args(tmp_path), "resume=true"], recipe="knowrl"), log=lambda *_: None)
    assert resumed.hint_choice == {}
    resumed._resume()
    assert resumed.hint_choice == trainer.hint_choice
