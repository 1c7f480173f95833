"""Per-step metrics to `metrics.jsonl` (one JSON object per line, flushed at once) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Rows past the resumed step are redone; a last line without its newline is a row
            # torn by a kill (rows are written after their step, so it is past the checkpoint).
            lines = self.path.read_text().split("\n")[:-1]
            kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        self._file = self.path.open("a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, values: dict) -> None:
        row = {"step": step, **values}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in values.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        self._tb.close()


class NullLog:
    """A MetricsLog that writes nothing (the ranks ≥ 1 of a data-parallel run)."""

    def log(self, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
