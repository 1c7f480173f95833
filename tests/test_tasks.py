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


def test_missing_jsonl_file():
    with pytest.raises(TaskError, match="does not exist"):
        build_task(build_config(None, ["task=/no/such.jsonl"]))


class _Flaky:
    def __init__(self, value):
        self.value = value

    def score(self, completion, example):
        if isinstance(self.value, Exception):
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
    ],
)
def test_safe_score_turns_failures_into_zero(value, expected):
    assert safe_score(_Flaky(value), "text", None) == expected
