"""Helpers of the reliability tests that train and compare whole runs."""

from __future__ import annotations

from pathlib import Path

import torch

from divrl.config import build_config
from divrl.runlog import read_metrics
from divrl.trainer import Trainer


def train_on_one_thread(overrides: list[str]) -> list[str]:
    """Run (or resume) the config of `overrides` in this process on one thread, as a killed child
    does; returns the log lines."""
    threads, lines = torch.get_num_threads(), []
    torch.set_num_threads(1)
    try:
        Trainer(build_config(None, overrides), log=lines.append).run()
    finally:
        torch.set_num_threads(threads)
    return lines


def comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    return [
        {k: v for k, v in row.items() if not k.startswith("time_")} for row in read_metrics(run_dir / "metrics.jsonl")
    ]
