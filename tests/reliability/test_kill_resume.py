"""`kill -9` at three points of a run — during generation, in the optimizer step, in the middle of
a checkpoint write — then `resume=true`: the run continues from the last complete checkpoint,
and its metrics and final weights equal an uninterrupted run's bit for bit (CPU, fixed seeds).

The run is a real subprocess killed by a real SIGKILL; to stop it at a precise point, a hook in
the child writes a marker file there and sleeps until the parent kills it. The config exercises
the state a resume must restore: the curriculum's EMA, SIREN's entropy anchor, the calibration's
reference rewards, dynamic sampling's refills, the reward-error count and the RNGs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import comparable, train_on_one_thread

from divrl.checkpoint import MANIFEST
from divrl.runlog import MetricsLog, read_metrics

CHILD = '''
import sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)
import divrl.trainer
from divrl.config import build_config

point, at_step, marker, *overrides = sys.argv[1:]
trainer = divrl.trainer.Trainer(build_config(None, overrides), log=lambda *_: None)


def stop_here(*_):
    """Tell the parent the run reached `point` at `at_step`, then wait for its SIGKILL."""
    if trainer.step == int(at_step):
        Path(marker).write_text(point)
        time.sleep(600)


if point == "generation":  # trainer.step is the steps done: the step in progress is at_step + 1
    real_sample = divrl.trainer.sample

    def sample(*args, **kwargs):
        stop_here()
        return real_sample(*args, **kwargs)

    divrl.trainer.sample = sample
elif point == "optimizer":
    trainer.optimizer.register_step_pre_hook(stop_here)
elif point == "checkpoint":  # while checkpoint step-<at_step> is written: after optimizer.pt, before the rest
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if Path(path).name == "optimizer.pt":
            stop_here()

    torch.save = save
trainer.run()
'''

VERIFIER = (
    "def parity(completion, answer):\n"
    "    if len(completion) % 3 == 0:\n"
    "        raise ValueError('a verifier bug, counted in reward_errors')\n"
    "    return float(len(completion) % 2)\n"
)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A JSONL task (6 training prompts) whose verifier (the completion's length parity; it raises
    on a third of the lengths) gives the untrained tiny model mixed rewards, so groups differ,
    dynamic sampling both keeps and drops, and reward errors are counted; on sys.path."""
    folder = tmp_path_factory.mktemp("task")
    (folder / "say.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Say {a}", "answer": str(a)}) + "\n" for a in range(10))
    )
    (folder / "parity_verifier.py").write_text(VERIFIER)
    (folder / "child.py").write_text(CHILD)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        patch.delitem(sys.modules, "parity_verifier", raising=False)  # not another test's module of that name
        yield folder


def overrides(run_dir: Path, task_dir: Path) -> list[str]:
    """The run: its curriculum reacts at once (α 0, σ 0.1), so a resume that lost the EMA would
    draw other prompts; the entropy anchor and the calibration set would be recomputed."""
    return [
        "model=tiny",
        "device=cpu",
        "dtype=float32",
        f"output_dir={run_dir}",
        "steps=4",
        "checkpoint_every=1",
        "prompts_per_step=2",
        "group_size=2",
        "max_new_tokens=6",
        "eval_size=4",
        "eval_samples=2",
        "eval_every=2",
        "lr=1e-3",
        f"task={task_dir / 'say.jsonl'}",
        "verifier=parity_verifier:parity",
        "prompt_sampler={gaussian_curriculum: {alpha: 0, sigma: 0.1}}",
        "entropy_anchor={coef: 0.01}",
        "dynamic_sampling=true",
        "max_refills=1",
        "kl_coef=0.1",
        "reward_calibration={samples: 2, t: 1.0}",
    ]


def train(run_dir: Path, task_dir: Path, *extra: str) -> list[str]:
    """Run (or resume) in this process on one thread, as the child does; returns the log lines."""
    return train_on_one_thread([*overrides(run_dir, task_dir), *extra])


def final_weights_sha256(run_dir: Path) -> str:
    manifest = json.loads((run_dir / "checkpoints" / "step-4" / MANIFEST).read_text())
    return manifest["files"]["model.safetensors"]["sha256"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, task_dir):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(run_dir, task_dir)
    return comparable(run_dir), final_weights_sha256(run_dir)


def kill_at(run_dir: Path, task_dir: Path, point: str, at_step: int) -> None:
    """Start the run in a subprocess, SIGKILL it when it reaches `point` after `at_step` steps."""
    marker, errors = run_dir.parent / "reached", run_dir.parent / "child.stderr"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(task_dir), os.environ.get("PYTHONPATH")])),
    }
    with errors.open("w") as stderr:
        child = subprocess.Popen(
            [
                sys.executable,
                str(task_dir / "child.py"),
                point,
                str(at_step),
                str(marker),
                *overrides(run_dir, task_dir),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 300
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        child.kill()
        child.wait()
        pytest.fail(
            f"the run never reached {point} at step {at_step} (exit {child.returncode}):\n{errors.read_text()[-3000:]}"
        )
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.parametrize(
    ("point", "at_step", "resumed_from"),
    [
        ("generation", 1, 1),  # step 2's rollout: step-1 is the last checkpoint
        ("optimizer", 2, 2),  # step 3's AdamW step
        ("checkpoint", 3, 2),  # writing step-3: its half-written directory must not count
    ],
)
def test_kill_9_then_resume_repeats_the_uninterrupted_run(
    tmp_path, task_dir, uninterrupted, point, at_step, resumed_from
):
    run_dir = tmp_path / "run"
    kill_at(run_dir, task_dir, point, at_step)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*"))[-1] == f"step-{resumed_from}"
    partial = [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert [p.name.split(".")[1] for p in partial] == (["step-3"] if point == "checkpoint" else [])

    lines = train(run_dir, task_dir, "resume=true")

    assert f"resumed from {checkpoints / f'step-{resumed_from}'} (step {resumed_from})" in lines
    assert [f"removed {p}: an interrupted checkpoint write (never loaded)" for p in partial] == [
        line for line in lines if line.startswith("removed")
    ]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    rows, weights = uninterrupted
    assert [r["step"] for r in comparable(run_dir)] == [r["step"] for r in rows] == [0, 1, 2, 3, 4, 4]
    assert comparable(run_dir) == rows  # bit-identical: exact float equality, row by row
    assert final_weights_sha256(run_dir) == weights


def test_a_row_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    """A kill while writing metrics.jsonl can leave a last line without its newline; resuming
    keeps the complete rows up to the checkpoint's step and drops the rest."""
    rows = [{"step": s, "reward": s / 10} for s in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')
    assert read_metrics(tmp_path / "metrics.jsonl") == rows  # readers (report, compare, inspect) skip it
    MetricsLog(tmp_path, resume_step=2).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == rows[:3]
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "rew\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{tmp_path / 'metrics.jsonl'}:2: not valid JSON"):
        read_metrics(tmp_path / "metrics.jsonl")  # a bad line that is not the last: no kill did that


def test_resume_keeps_the_rows_up_to_the_checkpoints_training_row(tmp_path):
    """A finished run's final evaluation (a second row at the last step) is redone on resume, not
    kept; resuming with no checkpoint (step 0) keeps nothing, as the run starts over."""
    rows = [{"step": 0, "eval": 0.1}, {"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.7}, {"step": 2, "eval": 0.3}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    for step, kept in ((2, rows[:3]), (1, rows[:2]), (0, [])):
        (tmp_path / "metrics.jsonl").write_text(text)
        MetricsLog(tmp_path, resume_step=step).close()
        assert read_metrics(tmp_path / "metrics.jsonl") == kept


def test_an_interrupted_rewrite_on_resume_leaves_the_rows_whole(tmp_path, monkeypatch):
    """Resume rewrites metrics.jsonl through a temporary file and a rename: an interruption before
    the rename (here, in its fsync) leaves the old file as it was."""
    text = "".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in range(5))
    (tmp_path / "metrics.jsonl").write_text(text)

    def interrupted(_fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(tmp_path, resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
