"""Per-step metrics to `metrics.jsonl` (one JSON object per line, flushed at once) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

from divrl.atomic import write_text_atomically


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None):
        """`resume_step`: a resumed run's checkpoint step (0: none, the run starts over). The rows
        after that checkpoint are dropped (`rows_until`), and TensorBoard's events from that step
        on are purged and the kept row of that step written again."""
        self.path = run_dir / "metrics.jsonl"
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)
        if resume_step is not None and self.path.exists():
            kept = rows_until(read_metrics(self.path), resume_step)
            write_text_atomically(self.path, "".join(json.dumps(row) + "\n" for row in kept))
            for row in kept:
                if row.get("step", 0) == resume_step:
                    self._add_scalars(resume_step, row)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, values: dict) -> None:
        row = {"step": step, **values}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._add_scalars(step, values)
        self._tb.flush()

    def _add_scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


class NullLog:
    """A MetricsLog that writes nothing (the ranks ≥ 1 of a data-parallel run)."""

    def log(self, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: Path, error: type[Exception] = ValueError) -> list[dict]:
    """The rows of a run's metrics.jsonl. A last line without its newline that is not JSON is a row
    torn by a kill: skipped, as resuming the run drops it; any other bad line raises `error` naming
    file:line."""
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise error(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{number}: a metrics row must be a JSON object")
        rows.append(row)
    return rows


def rows_until(rows: list[dict], step: int) -> list[dict]:
    """The metrics rows that a checkpoint at `step` follows: those up to its step's first row (its
    training row; a finished run's final evaluation follows it), none for step 0 (no checkpoint)."""
    kept: list[dict] = []
    for row in rows:
        row_step = row.get("step", 0)
        if not step or row_step > step:
            break
        kept.append(row)
        if row_step == step:
            break
    return kept
