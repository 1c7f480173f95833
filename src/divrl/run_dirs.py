"""Where a run lives when its config names no `output_dir`: a fresh `runs/<config>-<YYYYmmdd-HHMMSS>/`
per run, with `runs/latest` pointing to the newest, so the main job can be run again and again.

An explicit `output_dir` (in a recipe, the config file or `--set`) is left alone: it keeps the
refuse-or-resume rule of `divrl.trainer.check_output_dir`. `resume=true` without one continues the
newest run of the same config (the one `runs/latest` points to, unless another config ran since).
"""

from __future__ import annotations

import dataclasses
import os
import re
from datetime import datetime
from pathlib import Path

from divrl.atomic import write_text_atomically
from divrl.config import ConfigError, TrainConfig

RUNS = Path("runs")
LATEST = "latest"
STAMP = "%Y%m%d-%H%M%S"


def config_name(path: str | Path | None, recipe: str | None) -> str:
    """The name a fresh run directory starts with: the config file's stem, else the recipe's name."""
    return Path(path).stem if path is not None else recipe or "train"


def fresh_run_dir(name: str, root: Path = RUNS, now: datetime | None = None) -> Path:
    """Create and return `root/<name>-<date-time>`; a run started in the same second (by this or
    another process: mkdir is atomic) gets `-2`, `-3`, …"""
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{(now or datetime.now()).strftime(STAMP)}"
    n = 1
    while True:
        path = root / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            n += 1
            continue
        return path


def newest_run(name: str, root: Path = RUNS) -> Path | None:
    """The newest `root/<name>-<date-time>[-n]` directory, or None."""
    pattern = re.compile(rf"{re.escape(name)}-(\d{{8}}-\d{{6}})(?:-(\d+))?")
    found = [
        (m[1], int(m[2] or 1), path)
        for path in (root.iterdir() if root.is_dir() else ())
        if path.is_dir() and not path.is_symlink() and (m := pattern.fullmatch(path.name))
    ]
    return max(found)[2] if found else None


def point_latest(run_dir: Path) -> None:
    """`latest` beside `run_dir` → `run_dir`: a relative symlink, swapped in atomically; where
    symlinks fail (some Windows and network file systems), a text file holding the directory's name."""
    link = run_dir.parent / LATEST
    temporary = run_dir.parent / f".{LATEST}.{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(temporary, link)
    except OSError:
        temporary.unlink(missing_ok=True)
        write_text_atomically(link, run_dir.name + "\n")


def resolve_output_dir(cfg: TrainConfig, name: str, root: Path = RUNS) -> tuple[TrainConfig, Path | None]:
    """`cfg` with a concrete output_dir, and the fresh directory made for it (None when output_dir
    was explicit, or a run is resumed). Raises ConfigError when there is nothing to resume."""
    if cfg.output_dir is not None:
        return cfg, None
    if cfg.resume:
        run = newest_run(name, root)
        if run is None:
            raise ConfigError(
                f"config key 'resume': true without an output_dir continues the newest "
                f"{root / name}-<date-time>/, and there is none; set output_dir"
            )
        return dataclasses.replace(cfg, output_dir=str(run)), None
    fresh = fresh_run_dir(name, root)
    return dataclasses.replace(cfg, output_dir=str(fresh)), fresh
