"""A checkpoint is vouched for by its manifest: a corrupted, truncated or manifest-less one is
skipped with a warning naming it and never loaded (resume and `resolve_model` take the newest
intact one), and a write that fails (a full disk) leaves the previous checkpoint intact and says
so."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from run_helpers import comparable, train_on_one_thread

from divrl.checkpoint import (
    MANIFEST,
    CheckpointWriteError,
    checkpoint_problem,
    latest_checkpoint,
    resolve_model,
    save_checkpoint,
)
from divrl.config import ConfigError


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "device=cpu",
        "dtype=float32",
        f"output_dir={run_dir}",
        "steps=2",
        "checkpoint_every=1",
        "prompts_per_step=2",
        "group_size=2",
        "max_new_tokens=6",
        "eval_size=4",
        "eval_samples=2",
        "eval_every=0",
        "train_size=50",
        "lr=1e-3",
        *extra,
    ]


def train(run_dir: Path, *extra: str) -> list[str]:
    """Run (or resume) on one thread; returns the log lines."""
    return train_on_one_thread(overrides(run_dir, *extra))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-step run with checkpoints step-1 and step-2 (copied by each test)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(run_dir)
    return run_dir


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


FAULTS = {  # how the newest checkpoint is damaged → what the warning must say
    "flipped byte": (
        lambda step: flip_a_byte(step / "model.safetensors"),
        "model.safetensors does not match its sha256 in manifest.json (corrupted)",
    ),
    "truncated file": (lambda step: truncate(step / "optimizer.pt"), "optimizer.pt has"),
    "no manifest": (lambda step: (step / MANIFEST).unlink(), "it has no manifest.json"),
    "unreadable manifest": (lambda step: (step / MANIFEST).write_text('{"files": '), "its manifest.json is unreadable"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_checkpoint_is_skipped_with_a_warning_and_never_loaded(tmp_path, finished, fault):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    step1, step2 = run_dir / "checkpoints" / "step-1", run_dir / "checkpoints" / "step-2"
    damage, why = FAULTS[fault]
    damage(step2)
    warning = f"checkpoint {step2} skipped: {why}"

    with pytest.warns(UserWarning, match=re.escape(warning)):
        assert resolve_model(str(run_dir)) == str(step1)
    lines = train(run_dir, "resume=true")

    assert any(line.startswith(f"warning: {warning}") and line.endswith("it is not loaded") for line in lines)
    assert f"resumed from {step1} (step 1)" in lines
    # Step 2 redone from step-1 repeats the original exactly (the damaged weights were not used),
    # and its new checkpoint replaced the damaged one.
    assert comparable(run_dir) == comparable(finished)
    assert checkpoint_problem(step2) is None
    assert (run_dir / "checkpoints" / "broken-step-2").is_dir()  # set aside for inspection


def test_pruning_after_a_resume_keeps_the_intact_checkpoints(tmp_path, finished):
    """Broken step-2 and step-5 (a flipped byte: their sizes still match) are set aside on resume,
    so the redone step-2 is the newest checkpoint that keep_checkpoints=1 keeps; before, the broken
    step-5 counted as the newest and pruning deleted every intact one."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    checkpoints = run_dir / "checkpoints"
    flip_a_byte(checkpoints / "step-2" / "model.safetensors")
    shutil.copytree(checkpoints / "step-2", checkpoints / "step-5")
    lines = train(run_dir, "resume=true", "keep_checkpoints=1")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["broken-step-2", "broken-step-5", "step-2"]
    assert f"set aside {checkpoints / 'broken-step-5'}: not intact, so never loaded, pruned or overwritten" in lines
    assert latest_checkpoint(run_dir) == (2, checkpoints / "step-2")


def test_a_run_without_an_intact_checkpoint_is_not_resumed(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    for step in ("step-1", "step-2"):
        flip_a_byte(run_dir / "checkpoints" / step / "model.safetensors")
    with (
        pytest.raises(FileNotFoundError, match=re.escape(f"run directory '{run_dir}' has no complete checkpoint")),
        pytest.warns(UserWarning, match="skipped"),
    ):
        resolve_model(str(run_dir))
    with pytest.raises(ConfigError, match=re.escape(f"no checkpoint in {run_dir / 'checkpoints'} is intact")):
        train(run_dir, "resume=true")


@contextlib.contextmanager
def no_space_left(monkeypatch):
    """torch.save writes half of its bytes, then fails as a full disk does (ENOSPC)."""
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        yield os.strerror(errno.ENOSPC)


@contextlib.contextmanager
def file_size_limit(monkeypatch):
    """A real write failure from the kernel: RLIMIT_FSIZE below the weights' size (EFBIG)."""
    resource = pytest.importorskip("resource")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        yield os.strerror(errno.EFBIG)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("inject", [no_space_left, file_size_limit], ids=["ENOSPC", "file size limit"])
def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, tiny, monkeypatch, inject):
    model, tokenizer = tiny
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    step1 = save_checkpoint(tmp_path, 1, model, tokenizer, optimizer, generator, keep=1)
    manifest = (step1 / MANIFEST).read_text()
    target = tmp_path / "checkpoints" / "step-2"

    with inject(monkeypatch) as reason, pytest.raises(CheckpointWriteError) as failed:
        save_checkpoint(tmp_path, 2, model, tokenizer, optimizer, generator, keep=1)

    message = str(failed.value)
    assert message.startswith(f"writing checkpoint {target} failed: ")
    assert reason in message and f"the previous checkpoint {step1} is intact" in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]  # no step-2, no leftovers
    assert (step1 / MANIFEST).read_text() == manifest and checkpoint_problem(step1) is None
    assert latest_checkpoint(tmp_path) == (1, step1)
    # Once a write succeeds, keep=1 prunes the older one — only then.
    assert save_checkpoint(tmp_path, 2, model, tokenizer, optimizer, generator, keep=1) == target
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]
    assert json.loads((target / MANIFEST).read_text())["files"].keys() >= {
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "trainer_state.json",
    }
