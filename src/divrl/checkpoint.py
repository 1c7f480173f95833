"""Checkpoints `checkpoints/step-N/`: HF `from_pretrained`-loadable weights and tokenizer, the
optimizer state, the sampling RNG state and the trainer's step, written atomically so that an
interruption never leaves a half-written checkpoint behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from divrl.atomic import save_atomically

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer,
                    generator: torch.Generator, keep: int, state: dict | None = None) -> Path:
    """Write `checkpoints/step-N/`; `state` (JSON-able: e.g. the prompt sampler's) goes into
    trainer_state.json beside the step."""
    target = run_dir / "checkpoints" / f"step-{step}"

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"sampling": generator.get_state(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(state or {})}))  # written last

    save_atomically(target, save)
    for _, old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model, optimizer, generator: torch.Generator) -> dict:
    """Restore weights, optimizer and RNG state from `path`; returns its trainer state (its
    "step" and whatever `save_checkpoint` was given)."""
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))  # to the params' device
    rng = torch.load(path / "rng.pt", weights_only=True)
    generator.set_state(rng["sampling"])
    torch.set_rng_state(rng["torch"])
    return json.loads((path / "trainer_state.json").read_text())


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` is a divrl run directory (it has the run's saved config or checkpoints)."""
    path = Path(path)
    return path.is_dir() and ((path / "config.yaml").is_file() or (path / "checkpoints").is_dir())


def resolve_model(spec: str) -> str:
    """`spec` as a model source: a run directory stands for its latest complete checkpoint (a
    run directory without one raises FileNotFoundError naming it); anything else is returned as is
    (a model directory, 'default', 'tiny', a hub id — `divrl.models.load_model` takes those)."""
    if not is_run_dir(spec):
        return spec
    found = checkpoint_dirs(Path(spec))
    if not found:
        raise FileNotFoundError(f"run directory '{spec}' has no complete checkpoint "
                                f"(checkpoints/step-N/ with trainer_state.json)")
    return str(found[-1][1])
