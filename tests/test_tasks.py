import json

import pytest

from divrl.config import build_config
from divrl.tasks import TaskError, build_task, extract_answer, safe_score


def test_extract_answer_rules():
    assert extract_answer("so <answer> 12 </answer> done") == "12"
    assert extract_answer("x \\boxed{7} y") == "7"
    assert extract_answer("The answer is 1,000.") == "1,000"
    assert extract_answer("3 + 4 = 7") == "7"
    assert extract_answer("  yes ") == "yes"


def test_reasoning_gym_task_scores_with_its_own_verifier_and_holds_out():
    task = build_task(build_config(None, ["train_size=300", "eval_size=20"]))
    assert task.name == "chain_sum" and len(task.eval) == 20
    assert not {e.prompt for e in task.eval} & {e.prompt for e in task.train}
    ex = task.eval[0]
    assert task.score(f"The answer is {ex.answer}.", ex) == 1.0
    assert task.score(f"The answer is {int(ex.answer) + 1}.", ex) == 0.0


def test_unknown_task_lists_valid_names():
    with pytest.raises(TaskError, match=r"unknown task 'chain_summ'.*chain_sum"):
        build_task(build_config(None, ["task=chain_summ"]))


def _write(path, rows):
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_jsonl_task_exact_and_user_verifier(tmp_path, monkeypatch):
    rows = [json.dumps({"prompt": f"What is {i}+1?", "answer": str(i + 1)}) for i in range(10)]
    path = _write(tmp_path / "d.jsonl", rows)
    task = build_task(build_config(None, [f"task={path}", "eval_size=3"]))
    assert (len(task.train), len(task.eval)) == (7, 3)
    ex = task.train[0]
    assert task.score(f"It is {ex.answer}", ex) == 1.0 and task.score("It is -1", ex) == 0.0

    (tmp_path / "myverifier.py").write_text(
        "def half(completion, answer):\n    return 0.5 if answer in completion else 0.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = build_task(build_config(None, [f"task={path}", "verifier=myverifier:half"]))
    assert task.score(task.train[0].answer, task.train[0]) == 0.5
    with pytest.raises(TaskError, match="cannot be loaded"):
        build_task(build_config(None, [f"task={path}", "verifier=myverifier:nope"]))


@pytest.mark.parametrize(
    "bad, why",
    [
        ('{"prompt": "a", "answer": "1"', "not valid JSON"),
        ('{"prompt": "a"}', "needs 'prompt' and 'answer'"),
        ('{"prompt": 3, "answer": "1"}', "'prompt' must be a non-empty string"),
    ],
)
def test_malformed_jsonl_line_reports_file_and_line(tmp_path, bad, why):
    rows = [json.dumps({"prompt": "p", "answer": "1"})] * 2 + [bad]
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskError, match=f"bad.jsonl:3: .*{why}"):
        build_task(build_config(None, [f"task={path}"]))


def test_json_number_answers_read_as_a_model_writes_them(tmp_path):
    rows = ['{"prompt": "a", "answer": 1e3}', '{"prompt": "b", "answer": 3.0}', '{"prompt": "c", "answer": 1e21}']
    rows += ['{"prompt": "d", "answer": 2.50}', '{"prompt": "e", "answer": 1e-7}', '{"prompt": "f", "answer": 7}']
    task = build_task(build_config(None, [f"task={_write(tmp_path / 'n.jsonl', rows)}", "eval_size=1"]))
    answers = {e.prompt: e.answer for e in task.train + task.eval}
    assert answers == {"a": "1000", "b": "3", "c": "1" + "0" * 21, "d": "2.5", "e": "0.0000001", "f": "7"}
    assert task.numeric
    ex = next(e for e in task.train + task.eval if e.prompt == "a")
    assert task.score("10*100 = 1000", ex) == 1.0


def test_non_finite_json_answer_is_refused(tmp_path):
    path = _write(tmp_path / "inf.jsonl", ['{"prompt": "a", "answer": 1}', '{"prompt": "b", "answer": Infinity}'])
    with pytest.raises(TaskError, match=r"inf\.jsonl:2: 'answer' must be a finite number"):
        build_task(build_config(None, [f"task={path}"]))


def test_missing_jsonl_file():
    with pytest.raises(TaskError, match="does not exist"):
        build_task(build_config(None, ["task=/no/such.jsonl"]))


class _Flaky:
    def __init__(self, value):
        self.value = value

    def score(self, completion, example):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


@pytest.mark.parametrize(
    "value, expected",
    [
        (1.0, (1.0, True)),
        (0, (0.0, True)),
        (True, (1.0, True)),
        (RuntimeError("boom"), (0.0, False)),
        ("1", (0.0, False)),
        (None, (0.0, False)),
        (float("nan"), (0.0, False)),
        (10**400, (0.0, False)),  # too large for a float
        (SystemExit(0), (0.0, False)),
    ],
)
def test_safe_score_turns_failures_into_zero(value, expected):
    assert safe_score(_Flaky(value), "text", None) == expected


def test_a_demonstration_of_the_right_answer_passes_every_built_in_task(tmp_path):
    from reasoning_gym.factory import DATASETS

    from divrl.demos import from_answers
    from divrl.tasks import ReasoningGymTask

    rows = [json.dumps({"prompt": f"Spell {w} backward", "answer": w[::-1]}) for w in ("cat", "dog")]
    tasks = [build_task(build_config(None, [f"task={_write(tmp_path / 'words.jsonl', rows)}", "eval_size=1"]))]
    tasks += [ReasoningGymTask(name, {}, 2, 1, 0, 1) for name in sorted(DATASETS) if name != "composite"]
    for task in tasks:
        examples = [e for e in task.train + task.eval if e.entry.get("answer") is not None]  # None: open-ended
        for demo, example in zip(from_answers(examples), examples):
            assert task.score(demo.completion, example) == 1.0, (task.name, demo.completion)
