"""Verifiers are untrusted code: real hangs, exceptions, bad returns, segfaults and `os._exit`
score 0, are counted by kind, and neither stop nor hang training (`divrl.guarded_verifier`)."""

import os
import signal
import sys
import time
import types
from pathlib import Path

import pytest

from divrl.config import ConfigError, build_config
from divrl.guarded_verifier import CRASH, ERROR, TIMEOUT, GuardedVerifier
from divrl.tasks import Example, TaskError, build_task
from divrl.trainer import Trainer

# Faults chosen by the answer, so one batch holds every kind.
BY_ANSWER = """import os, signal, sys, time

def by_answer(completion, answer):
    if answer == "hang":
        time.sleep(3600)
    if answer == "stubborn":  # a verifier's `except Exception` must not swallow the time limit
        while True:
            try:
                time.sleep(3600)
            except Exception:
                pass
    if answer == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if answer == "exit":
        os._exit(1)
    if answer == "raise":
        raise ValueError("verifier bug")
    if answer == "nan":
        return float("nan")
    if answer == "string":
        return "1"
    if answer == "torch?":
        return float("torch" in sys.modules)
    time.sleep(0.01 * (len(completion) % 4))  # calls finish out of order
    return float(answer) / 10
"""

TIMEOUT_S = 0.5


def _task(say_task, verifier, source):
    return build_task(build_config(None, [*say_task([1, 2, 3], verifier, source), "eval_size=1"]))


def _calls(*answers):
    return [("x" * i, Example("Say it", answer)) for i, answer in enumerate(answers)]


def test_in_process_hangs_time_out_and_failures_score_zero(say_task):
    verifier = GuardedVerifier(_task(say_task, "by_answer", BY_ANSWER), timeout=TIMEOUT_S)
    start = time.monotonic()
    outcomes = verifier.score(_calls("3", "hang", "stubborn", "raise", "nan", "string", "7"))
    assert time.monotonic() - start < 2 * TIMEOUT_S + 1  # two hangs, each cut at the limit
    assert outcomes == [
        (0.3, None),
        (0.0, TIMEOUT),
        (0.0, TIMEOUT),
        (0.0, ERROR),
        (0.0, ERROR),
        (0.0, ERROR),
        (0.7, None),
    ]


def test_workers_survive_segfault_exit_and_hang_and_recover(say_task):
    verifier = GuardedVerifier(
        _task(say_task, "by_answer_pool", BY_ANSWER.replace("by_answer", "by_answer_pool")),
        timeout=TIMEOUT_S,
        workers=2,
    )
    try:
        first = [w.process for w in verifier.pool.workers]
        start = time.monotonic()
        outcomes = verifier.score(_calls("1", "segfault", "2", "exit", "hang", "raise", "nan", "string", "3"))
        assert time.monotonic() - start < TIMEOUT_S + 5
        assert outcomes == [
            (0.1, None),
            (0.0, CRASH),
            (0.2, None),
            (0.0, CRASH),
            (0.0, TIMEOUT),
            (0.0, ERROR),
            (0.0, ERROR),
            (0.0, ERROR),
            (0.3, None),
        ]
        assert all(p.poll() is not None for p in first)  # both were killed and replaced
        now = [w.process for w in verifier.pool.workers]
        assert verifier.score(_calls("4", "5", "torch?")) == [(0.4, None), (0.5, None), (0.0, None)]
    finally:
        verifier.close()
    assert all(p.poll() is not None for p in now)


def test_worker_rewards_follow_their_calls_not_the_order_they_finish_in(say_task):
    task = _task(say_task, "by_answer_order", BY_ANSWER.replace("by_answer", "by_answer_order"))
    calls = _calls(*[str(i % 10) for i in range(24)])
    pooled = GuardedVerifier(task, timeout=TIMEOUT_S, workers=3)
    try:
        assert pooled.score(calls) == GuardedVerifier(task, timeout=TIMEOUT_S).score(calls)
    finally:
        pooled.close()


@pytest.mark.parametrize(
    "function, why", [("lam", "cannot be sent to a worker process"), ("score", "cannot load the task's verifier")]
)
def test_a_verifier_workers_cannot_load_is_refused_naming_the_key(say_task, monkeypatch, function, why):
    ghost = types.ModuleType("ghost_verifier")  # importable in this process only, like a notebook's
    exec("def score(completion, answer):\n    return 1.0\nlam = lambda completion, answer: 1.0\n", ghost.__dict__)
    monkeypatch.setitem(sys.modules, "ghost_verifier", ghost)
    task_file = say_task([1, 2, 3], "always")[0]
    task = build_task(build_config(None, [task_file, f"verifier=ghost_verifier:{function}", "eval_size=1"]))
    with pytest.raises(TaskError, match=f"'reward_workers'.*{why}"):
        GuardedVerifier(task, workers=1)


# Faults that pass for a result unless caught: an int too large for a float, sys.exit, a bare
# `except:` that swallows the time limit and answers late, a child process left behind.
SNEAKY = """import subprocess, sys, time

def sneaky(completion, answer):
    if answer == "huge":
        return 10**400
    if answer == "exits":
        sys.exit(0)
    if answer == "swallow":
        end = time.monotonic() + 1.0  # twice the limit
        while time.monotonic() < end:
            try:
                time.sleep(0.01)
            except:  # noqa: E722
                pass
        return 1.0
    if answer == "spawn":  # the child's pid goes to the file the completion names
        with open(completion, "w") as handle:
            handle.write(str(subprocess.Popen(["sleep", "300"]).pid))
        time.sleep(3600)
    return 1.0
"""


def _exited(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie awaiting its reaper counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def test_in_process_huge_ints_exits_and_late_results_are_failures(say_task):
    verifier = GuardedVerifier(_task(say_task, "sneaky", SNEAKY), timeout=TIMEOUT_S)
    outcomes = verifier.score(_calls("huge", "exits", "swallow", "1"))
    assert outcomes == [(0.0, ERROR), (0.0, ERROR), (0.0, TIMEOUT), (1.0, None)]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
def test_workers_score_huge_ints_and_exits_and_kill_what_a_timed_out_verifier_started(say_task, tmp_path):
    pid_file = tmp_path / "child.pid"
    verifier = GuardedVerifier(
        _task(say_task, "sneaky_pool", SNEAKY.replace("sneaky", "sneaky_pool")), timeout=TIMEOUT_S, workers=1
    )
    try:
        calls = [("", Example("Say it", "huge")), ("", Example("Say it", "exits"))]
        outcomes = verifier.score([*calls, (str(pid_file), Example("Say it", "spawn"))])
    finally:
        verifier.close()
    child = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 5
        while not _exited(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _exited(child)
    finally:
        if not _exited(child):
            os.kill(child, signal.SIGKILL)
    assert outcomes == [(0.0, ERROR), (0.0, ERROR), (0.0, TIMEOUT)]


# Each fault once (across worker processes), then full marks: the step after the faults is clean.
ONCE = """import os, signal, time

MARKS = {marks!r}

def {name}(completion, answer):
    for fault in {faults!r}:
        try:
            os.close(os.open(os.path.join(MARKS, fault), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        if fault == "hang":
            time.sleep(3600)
        if fault == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if fault == "exit":
            os._exit(1)
        raise ValueError("verifier bug")
    return 1.0
"""


@pytest.mark.parametrize("workers, faults", [(0, ("hang", "raise")), (2, ("hang", "segfault", "exit", "raise"))])
def test_training_goes_on_through_faulty_verifier_calls(say_task, tmp_path, one_thread, workers, faults):
    name = f"once_{workers}"
    source = ONCE.format(marks=str(tmp_path), name=name, faults=faults)
    cfg = build_config(
        None,
        [
            *say_task(range(12), name, source),
            "model=tiny",
            f"output_dir={tmp_path / 'run'}",
            "prompts_per_step=2",
            "group_size=4",
            "max_new_tokens=4",
            "eval_size=2",
            f"reward_timeout={TIMEOUT_S}",
            f"reward_workers={workers}",
        ],
    )
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        faulty, clean = trainer.train_step(0), trainer.train_step(1)
    finally:
        trainer.verifier.close()
    crashes = sum(f in ("segfault", "exit") for f in faults)
    assert (faulty["reward_errors"], faulty["reward_timeouts"], faulty["reward_crashes"]) == (len(faults), 1, crashes)
    assert faulty["reward"] == pytest.approx((8 - len(faults)) / 8)
    assert (clean["reward_errors"], clean["reward"], clean["reward_errors_total"]) == (0, 1.0, len(faults))
    assert "grad_norm" in faulty and "grad_norm" in clean  # both steps updated the model


@pytest.mark.parametrize(
    "override, why", [("reward_timeout=0", "must be > 0 seconds"), ("reward_workers=-1", "must be ≥ 0")]
)
def test_bad_limits_are_refused_naming_the_key(override, why):
    with pytest.raises(ConfigError, match=f"'{override.split('=')[0]}' {why}"):
        build_config(None, [override])


def test_no_time_limit_is_allowed():
    assert build_config(None, ["reward_timeout=null"]).reward_timeout is None
