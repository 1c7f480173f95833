"""`divrl eval` / `divrl compare`: the estimators against brute force and simulation, and the
commands on the tiny model."""

import itertools
import json
import math

import numpy as np
import pytest

from divrl import evaluation, metrics
from divrl.cli import main

TINY_EVAL = ["--set", "eval_size=3", "--set", "max_new_tokens=5", "--set", "train_size=20"]


# ----- estimators -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 5, 6])
def test_pass_at_k_equals_enumeration_of_k_subsets(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            assert metrics.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    truth, trials, covered = 0.3, 300, 0
    for trial in range(trials):
        values = rng.binomial(1, truth, size=60)
        low, high = metrics.bootstrap_ci(values, resamples=1000, seed=trial)
        covered += low <= truth <= high
    assert 0.90 <= covered / trials <= 0.99


def test_paired_difference_interval_is_narrower_than_unpaired_on_correlated_prompts():
    rng = np.random.default_rng(0)
    difficulty = rng.random(80)
    a, b = difficulty + 0.05, difficulty + rng.normal(0, 0.01, 80)
    paired = metrics.bootstrap_difference_ci(a, b, paired=True)
    unpaired = metrics.bootstrap_difference_ci(a, b, paired=False)
    assert paired[0] > 0 and paired[1] - paired[0] < (unpaired[1] - unpaired[0]) / 5


def test_majority_at_k_by_hand():
    answers, verdicts = ["7", "7", "8", "9"], [1, 1, 0, 0]
    assert metrics.majority_at_k(answers, verdicts, 4) == 1.0  # 7 has two votes
    assert metrics.majority_at_k(["1", "2"], [1, 0], 2) == 0.5  # a tie: the mean of the tied answers
    assert metrics.majority_at_k(answers, verdicts, 1) == 0.5  # maj@1 = pass@1
    # k = 2 by enumeration: of 6 pairs, {7,7} → 1, {7,8},{7,9} (×2 each) tie → ½, {8,9} tie → 0
    exact = (1 + 4 * 0.5 + 0) / 6
    assert metrics.majority_at_k(answers, verdicts, 2, draws=20000) == pytest.approx(exact, abs=0.01)


def test_distinct_n_by_hand():
    assert metrics.distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert metrics.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert metrics.distinct_n([[1]], 2) == 0.0


def test_best_of_n_kl_without_ties_tends_to_log_n_minus_n_minus_1_over_n():
    for n in (1, 2, 4, 16):
        _accuracy, kl = metrics.best_of_n(list(range(20000)), [0.0] * 20000, n)
        assert kl == pytest.approx(math.log(n) - (n - 1) / n, abs=2e-3)


def test_best_of_n_with_binary_scores_is_exact_and_below_the_bound():
    # picking by the verdict itself: accuracy = 1 − (1 − p)^N, KL = P log(P/p) + (1−P) log((1−P)/(1−p))
    scores = [1.0] * 3 + [0.0] * 7
    accuracy, kl = metrics.best_of_n(scores, scores, 4)
    p, big = 0.3, 1 - 0.7**4
    assert accuracy == pytest.approx(big)
    assert kl == pytest.approx(big * math.log(big / p) + (1 - big) * math.log((1 - big) / (1 - p)))
    assert kl < math.log(4) - 3 / 4


def _rows(prompts):
    """Fake samples: prompts = [(prompt, [(final answer, passed, token ids), ...]), ...]."""
    rows = []
    for i, (prompt, samples) in enumerate(prompts):
        for answer, passed, ids in samples:
            rows.append(
                {
                    "prompt_id": i,
                    "prompt": prompt,
                    "answer": "x",
                    "completion": f"so {answer}",
                    "completion_ids": ids,
                    "reward": float(passed),
                    "passed": passed,
                    "final_answer": answer,
                    "finished": True,
                    "length": len(ids),
                    "logprob_sum": -float(len(ids)),
                    "entropy_sum": 0.5 * len(ids),
                    "kl_sum": None,
                }
            )
    return rows


def test_summarize_on_hand_made_samples():
    rows = _rows(
        [
            ("p0", [("3", True, [1, 2]), ("3", True, [1, 2]), ("4", False, [5, 6])]),
            ("p1", [("9", False, [7]), ("8", False, [7]), ("8", False, [8])]),
        ]
    )
    out = evaluation.summarize({"task": "t"}, rows, ks=[1, 3])
    assert out["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["pass@3"] == pytest.approx(0.5) and out["coverage"] == 0.5
    assert out["maj@3"] == pytest.approx(0.5)
    assert out["distinct_correct_answers"] == pytest.approx((1 + 0) / 2)  # "3" twice
    assert out["distinct_correct_completions"] == pytest.approx((1 + 0) / 2)
    assert out["distinct_1"] == pytest.approx((4 / 6 + 2 / 3) / 2)
    assert out["entropy"] == pytest.approx(0.5) and out["kl"] is None
    assert out["per_prompt"] == {"prompt": ["p0", "p1"], "correct": [2, 0]}


def test_summarize_refuses_k_above_n_and_unequal_groups():
    rows = _rows([("p0", [("3", True, [1]), ("4", False, [1])])])
    with pytest.raises(evaluation.EvalError, match=r"k must lie in 1\.\.n = 2"):
        evaluation.summarize({}, rows, ks=[1, 4])
    with pytest.raises(evaluation.EvalError, match="same number of samples"):
        evaluation.summarize({}, [*rows, {**rows[0], "prompt_id": 1}])


# ----- the commands on the tiny model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert (
        main(
            [
                "eval",
                "--model",
                "tiny",
                "--n",
                "4",
                "--reference",
                "tiny",
                "--best-of",
                "1,4",
                "--out",
                str(out),
                *TINY_EVAL,
            ]
        )
        == 0
    )
    return out


def test_eval_writes_json_samples_and_plot(tiny_eval):
    result = json.loads((tiny_eval / "eval.json").read_text())
    assert result["ks"] == [1, 2, 4] and result["n"] == 4 and result["prompts"] == 3
    for key in (
        "pass@1",
        "pass@4",
        "pass@4_ci",
        "maj@4",
        "mean@n",
        "coverage",
        "distinct_2",
        "distinct_correct_answers",
        "distinct_correct_completions",
        "entropy",
        "length",
    ):
        assert key in result
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the same tiny model
    assert result["entropy"] > 5  # a random model over a 49k vocabulary
    assert result["best_of"]["4"]["kl_bound"] == pytest.approx(math.log(4) - 0.75)
    header, rows = evaluation.read_samples(tiny_eval)
    assert header["n"] == 4 and len(rows) == 12 and len({r["prompt"] for r in rows}) == 3
    assert (tiny_eval / "pass_at_k.png").stat().st_size > 10_000


def test_eval_recomputes_from_samples_without_a_model(tiny_eval, tmp_path, capsys):
    assert main(["eval", "--samples", str(tiny_eval / "samples.jsonl"), "--k", "1,3", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    first = json.loads((tiny_eval / "eval.json").read_text())
    assert again["ks"] == [1, 3] and again["pass@1"] == first["pass@1"] and again["entropy"] == first["entropy"]


def test_eval_of_a_run_directory_uses_its_latest_checkpoint_and_task(tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--set",
                "model=tiny",
                "--set",
                "steps=1",
                "--set",
                "prompts_per_step=2",
                "--set",
                "group_size=2",
                "--set",
                "eval_samples=2",
                "--set",
                f"output_dir={run}",
                "--set",
                "inspect_every=0",
                *TINY_EVAL,
            ]
        )
        == 0
    )
    assert main(["eval", "--model", str(run), "--n", "2"]) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert result["meta"]["model"].endswith("step-1") and result["prompts"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "tiny", "--n", "4", "--k", "1,8"], "cannot exceed n = 4"),
        (["--model", "tiny", "--n", "2", "--set", "eval_size=0"], "config key 'eval_size' must be ≥ 1, got 0"),
        (["--model", "tiny", "--n", "0"], "--n must be at least 1"),
    ],
)
def test_eval_bad_input(args, message, tmp_path, capsys):
    assert main(["eval", *args, "--out", str(tmp_path), "--set", "max_new_tokens=2", "--set", "train_size=20"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--k", "--best-of"])
def test_a_k_or_n_below_1_is_refused_before_any_sampling(flag, capsys, monkeypatch):
    monkeypatch.setattr(evaluation, "sample_eval", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "tiny", "--n", "4", flag, "1,0"])
    assert exit_info.value.code == 2 and "expected integers ≥ 1, got '1,0'" in capsys.readouterr().err


def test_sample_eval_refuses_an_empty_split(tiny):
    class Empty:
        name, eval = "empty", []

    with pytest.raises(evaluation.EvalError, match="task 'empty' has no held-out prompts"):
        evaluation.sample_eval(*tiny, Empty(), n=2, temperature=1.0, top_p=1.0, max_new_tokens=2, seed=0)


def test_eval_refuses_a_run_without_checkpoints_and_samples_of_another_task(tiny_eval, tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["eval", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
    assert main(["eval", "--samples", str(tiny_eval), "--task", "leg_counting", "--out", str(tmp_path / "o")]) == 2
    assert "holds samples of task 'chain_sum', not 'leg_counting'" in capsys.readouterr().err


def test_compare_overlays_and_pairs_the_differences(tiny_eval, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    result = json.loads((tiny_eval / "eval.json").read_text())
    result["per_prompt"]["correct"] = [4, 4, 4]
    for k in result["ks"]:
        result[f"pass@{k}"], result[f"pass@{k}_ci"] = 1.0, [1.0, 1.0]
    (other / "eval.json").write_text(json.dumps(result))
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_eval), str(other), "--labels", "base,perfect", "--out", str(out)]) == 0
    text = (out / "compare.md").read_text()
    assert "| perfect | 4 | +1.000 | [+1.000, +1.000] | paired bootstrap |" in text
    assert (out / "compare.png").stat().st_size > 20_000


def test_compare_refuses_evals_of_different_tasks(tiny_eval, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    result = json.loads((tiny_eval / "eval.json").read_text())
    result["meta"]["task"] = "leg_counting"
    (other / "eval.json").write_text(json.dumps(result))
    assert main(["compare", str(tiny_eval), str(other), "--out", str(tmp_path / "c")]) == 2
    assert "different tasks" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
    assert "neither a run directory nor an eval" in capsys.readouterr().err


def test_held_out_prompts_are_distinct():
    from divrl.config import TrainConfig
    from divrl.tasks import build_task

    task = build_task(TrainConfig())
    prompts = [e.prompt for e in task.eval]
    assert len(prompts) == 64 == len(set(prompts))
    assert not set(prompts) & {e.prompt for e in task.train}


def test_best_of_n_by_a_user_reward(tmp_path, monkeypatch):
    (tmp_path / "length_reward.py").write_text("def shortest(prompt, completion):\n    return -len(completion)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = _rows([("p0", [("3", True, [1]), ("44", False, [1, 2]), ("555", False, [1, 2, 3])])])
    for row in rows:
        row["completion"] = row["final_answer"]
    out = evaluation.summarize({}, rows, ks=[1], best_of=[3], selection="length_reward:shortest")
    # the shortest ("3", correct) is the best of 3 unless all three draws miss it: 1 − (2/3)^3
    assert out["best_of"]["3"]["accuracy"] == pytest.approx(1 - (2 / 3) ** 3)
    with pytest.raises(evaluation.EvalError, match="best-of-N reward 'nope:f' cannot be loaded"):
        evaluation.summarize({}, rows, ks=[1], best_of=[2], selection="nope:f")


# ----- bad samples files, and inputs of compare (no model) --------------------------------------


def _samples_file(path, header=None, rows=None):
    """A samples file of two prompts × two samples, as `divrl eval` writes it."""
    header = {"model": "tiny", "task": "t", "n": 2, "temperature": 1.0} if header is None else header
    rows = (
        _rows([("p0", [("3", True, [1]), ("4", False, [1])]), ("p1", [("5", False, [2])] * 2)])
        if rows is None
        else rows
    )
    evaluation.write_samples(path, header, rows)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda lines: lines.insert(3, "{not json"), "s.jsonl:4: not valid JSON"),
        (lambda lines: lines.__setitem__(4, "[1, 2]"), "s.jsonl:5: a sample must be a JSON object"),
        (
            lambda lines: lines.__setitem__(2, json.dumps({**json.loads(lines[2]), "passed": None})),
            "s.jsonl:3: the sample's 'passed' must be true or false",
        ),
        (
            lambda lines: lines.__setitem__(
                2, json.dumps({k: v for k, v in json.loads(lines[2]).items() if k != "passed"})
            ),
            "s.jsonl:3: the sample lacks 'passed'",
        ),
        (
            lambda lines: lines.__setitem__(0, json.dumps({"format": evaluation.FORMAT, "task": "t"})),
            "s.jsonl:1: the header lacks model, temperature",
        ),
    ],
)
def test_a_bad_samples_file_is_refused_naming_file_and_line(tmp_path, capsys, edit, message):
    path = _samples_file(tmp_path / "s.jsonl")
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(evaluation.EvalError, match=message):
        evaluation.read_samples(path)
    assert main(["eval", "--samples", str(path), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_recomputing_a_samples_file_never_overwrites_another_evals_samples(tmp_path, capsys):
    theirs = _samples_file(tmp_path / "samples.jsonl")
    before = theirs.read_bytes()
    mine = _samples_file(tmp_path / "x.jsonl", rows=_rows([("q", [("1", True, [3])] * 2)]))
    for _ in range(2):  # the default output is tmp_path/x, and recomputing again keeps its copy
        assert main(["eval", "--samples", str(mine)]) == 0
        assert evaluation.read_samples(tmp_path / "x") == evaluation.read_samples(mine)
    assert theirs.read_bytes() == before and not (tmp_path / "eval.json").exists()
    assert main(["eval", "--samples", str(mine), "--out", str(tmp_path)]) == 2
    assert f"{theirs} holds other samples than {mine}; choose another --out" in capsys.readouterr().err
    assert theirs.read_bytes() == before and not (tmp_path / "eval.json").exists()
    assert main(["eval", "--samples", str(theirs)]) == 0  # an eval directory's own samples: recomputed there
    assert theirs.read_bytes() == before and (tmp_path / "eval.json").exists()


def _run(path, rows, text=None):
    path.mkdir()
    (path / "config.yaml").write_text("model: tiny\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + (text or ""))
    return path


def _pass1(step, value):
    return {"step": step, "eval_pass@1": value, "eval_pass@1_se": 0.05, "eval_prompts": 8, "eval_samples": 4}


def test_compare_of_runs_only_shows_their_pass1_in_a_well_formed_table(tmp_path):
    a = _run(tmp_path / "a", [{"step": 1, "reward": 0.3, "kl": 0.01, "entropy": 1.0}, _pass1(1, 0.3)])
    b = _run(tmp_path / "b", [_pass1(1, 0.5)], text='{"step": 2, "reward": 0.')  # torn by a kill
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c")]) == 0
    table = (tmp_path / "c" / "compare.md").read_text().split("\n\n")[0].splitlines()
    cells = [line.strip("|").split("|") for line in table]
    assert [c.strip() for c in cells[0][:3]] == ["input", "prompts × n", "pass@1"]
    assert {len(c) for c in cells} == {10}
    assert [c.strip() for c in cells[3][:3]] == ["b", "8 × 4", "0.500 ± 0.050"]


def test_compare_refuses_a_bad_metrics_line_or_eval_json_naming_the_file(tmp_path, capsys):
    a = _run(tmp_path / "a", [_pass1(1, 0.3)], text='{"step": 2}\n')
    b = _run(tmp_path / "b", [_pass1(1, 0.5)], text="{torn\n" + json.dumps(_pass1(2, 0.5)) + "\n")
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c")]) == 2
    assert f"{b / 'metrics.jsonl'}:2: not valid JSON" in capsys.readouterr().err
    for bad in ("{bad", json.dumps({"ks": [1], "per_prompt": {}})):
        (a / "eval").mkdir(exist_ok=True)
        (a / "eval" / "eval.json").write_text(bad)
        assert main(["compare", str(a), "--out", str(tmp_path / "c")]) == 2
        assert f"{a / 'eval' / 'eval.json'}: not" in capsys.readouterr().err
