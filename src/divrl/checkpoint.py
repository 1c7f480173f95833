"""Checkpoints `checkpoints/step-N/`: HF `from_pretrained`-loadable weights (of a LoRA run: the
adapter as peft writes it, and with `lora.save_merged` the merged model in `merged/`:
`divrl.lora`) and tokenizer, the optimizer state, the RNG states and the trainer's state, written atomically (`divrl.atomic`) so
that an interruption — Ctrl-C, `kill -9`, a full disk — never leaves a half-written checkpoint
where a complete one is expected.

Each checkpoint ends with `manifest.json`, written after every other file: each file's relative
path, size in bytes and sha256. A checkpoint is *intact* when its manifest reads and every file it
lists is there with that size and checksum; only intact checkpoints are resumed from or resolved
as a run's model (`latest_checkpoint`), and every newer one that is not is skipped with a warning
naming it and why. A checkpoint directory without a manifest — written by a divrl from before
manifests, or copied in by hand — is never loaded from a run directory (its weights stay loadable
by passing the directory itself as a model).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from divrl import lora, sharding
from divrl.atomic import save_atomically

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PARTIAL_WRITE = re.compile(r"^\.step-\d+\.")  # save_atomically's temporary (and replaced) directories


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (a full disk, a file-size limit, …); the earlier ones are intact."""


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Every `checkpoints/step-N/` directory, intact or not, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path) -> None:
    """`directory/manifest.json`: every other file's relative path, size and sha256."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def checkpoint_problem(path: Path, checksums: bool = True) -> str | None:
    """Why the checkpoint `path` is not intact, or None if it is. Without `checksums` only the
    manifest and the files' sizes are checked (cheap: what a listing needs; a resume hashes)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return (
            f"it has no {MANIFEST} (its write did not finish, or an older divrl wrote it); pass "
            f"the directory itself as a model to use its weights"
        )
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its {MANIFEST} is unreadable ({type(err).__name__}: {err})"
    if "trainer_state.json" not in expected:
        return f"its {MANIFEST} lists no trainer_state.json"
    for name, (size, digest) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {MANIFEST} says {size} (truncated or overwritten)"
        if checksums and _sha256(file) != digest:
            return f"{name} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run (a readable manifest, every listed file there with its
    size), oldest first. Cheap — no file is hashed; `latest_checkpoint` verifies the checksums."""
    return [(step, p) for step, p in _step_dirs(run_dir) if checkpoint_problem(p, checksums=False) is None]


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def latest_checkpoint(run_dir: Path, warn: Callable[[str], None] = _warn) -> tuple[int, Path] | None:
    """The newest intact checkpoint of a run (checksums verified), or None; each newer
    `step-N/` that is not intact is skipped with `warn("checkpoint <path> skipped: <why>…")`."""
    for step, path in reversed(_step_dirs(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return step, path
        warn(f"checkpoint {path} skipped: {problem}; it is not loaded")
    return None


def set_aside_newer(run_dir: Path, step: int) -> list[Path]:
    """Rename each `checkpoints/step-N/` newer than `step` (the ones `latest_checkpoint` skipped as
    not intact) to `broken-step-N/`, kept for inspection; returns the new paths. A run resumed
    from `step` then never lists, prunes by or overwrites them: a broken step-N left in place
    counted as the newest of `keep_checkpoints` (a flipped byte keeps the sizes), so pruning
    deleted the intact ones."""
    moved = []
    for n, path in _step_dirs(run_dir):
        if n > step:
            target, copy = path.with_name(f"broken-{path.name}"), 1
            while target.exists():
                target, copy = path.with_name(f"broken-{path.name}-{copy}"), copy + 1
            moved.append(path.rename(target))
    return moved


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete what interrupted checkpoint writes left behind (`checkpoints/.step-N.*`, never
    loaded); returns their paths. Only a run's own trainer may call this (it must not be writing)."""
    root = run_dir / "checkpoints"
    partial = sorted(p for p in root.iterdir() if _PARTIAL_WRITE.match(p.name)) if root.is_dir() else []
    for path in partial:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return partial


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    optimizer,
    generator: torch.Generator,
    keep: int,
    state: dict | None = None,
    rank_generators: Sequence[torch.Tensor] = (),
    full_state: tuple[dict, dict] | None = None,
) -> Path:
    """Write `checkpoints/step-N/`; `state` (JSON-able: e.g. the prompt sampler's) goes into
    trainer_state.json beside the step; `rank_generators` (a data-parallel run's ranks 1, 2, …:
    `divrl.distributed`) go into rng-rank-R.pt; `full_state` (weights, optimizer state) is what a
    sharded model's ranks gathered (`divrl.sharding`), written in place of the model's own. The
    `keep` newest complete checkpoints are kept, older ones deleted only once the new one is
    complete. A failed write raises CheckpointWriteError naming the checkpoint, the cause and the
    previous checkpoint, which it leaves intact."""
    target = run_dir / "checkpoints" / f"step-{step}"

    def save(tmp: Path) -> None:
        if lora.info(model) is None:
            model.save_pretrained(tmp, state_dict=None if full_state is None else full_state[0])
        else:  # the adapter (peft's files), its base's spec, and merged/ with lora.save_merged
            lora.save(model, tmp)
        tokenizer.save_pretrained(tmp)
        if (tmp / lora.MERGED_DIR).is_dir():  # a complete from_pretrained directory, tokenizer included
            tokenizer.save_pretrained(tmp / lora.MERGED_DIR)
        torch.save(optimizer.state_dict() if full_state is None else full_state[1], tmp / "optimizer.pt")
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        torch.save({"sampling": generator.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}, tmp / "rng.pt")
        for rank, rank_state in enumerate(rank_generators, start=1):
            torch.save(rank_state, tmp / f"rng-rank-{rank}.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(state or {})}))
        write_manifest(tmp)  # last: it vouches for every file above

    previous = checkpoint_dirs(run_dir)
    try:
        save_atomically(target, save)
    except Exception as err:  # safetensors and torch.save report a full disk as their own errors
        intact = (
            f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint was written"
        )
        raise CheckpointWriteError(
            f"writing checkpoint {target} failed: {type(err).__name__}: {err}; "
            f"{intact}; free disk space (or fix the cause) and continue with "
            f"--set resume=true"
        ) from err
    for _, old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model, optimizer, generator: torch.Generator) -> dict:
    """Restore weights, optimizer and RNG state from `path`; returns its trainer state (its
    "step" and whatever `save_checkpoint` was given)."""
    from safetensors.torch import load_file

    if lora.is_adapter_dir(path) != (lora.info(model) is not None):
        raise RuntimeError(
            f"checkpoint {path} "
            + ("holds a LoRA adapter" if lora.is_adapter_dir(path) else "holds full weights")
            + ", the model "
            + ("has LoRA adapters" if lora.info(model) is not None else "has none")
            + ": resume with the config key 'lora' the run was trained with"
        )
    if lora.is_adapter_dir(path):
        lora.load(model, path)
    else:
        state = {}
        for shard in sorted(path.glob("*.safetensors")):
            state.update(load_file(shard))
        if sharding.is_sharded(model):  # every rank copies its shards from the full tensors
            missing, unexpected = sharding.load_weights(model, state)
        else:
            missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(
                f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}"
            )
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if sharding.is_sharded(model):
        sharding.load_optimizer_state(optimizer, optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)  # to the params' device
    rng = torch.load(path / "rng.pt", weights_only=True)
    generator.set_state(rng["sampling"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` is a divrl run directory (it has the run's saved config or checkpoints)."""
    path = Path(path)
    return path.is_dir() and ((path / "config.yaml").is_file() or (path / "checkpoints").is_dir())


def resolve_model(spec: str) -> str:
    """`spec` as a model source: a run directory stands for its latest intact checkpoint (checksums
    verified; a newer broken one is skipped with a warning; a run directory without an intact one
    raises FileNotFoundError naming it); anything else is returned as is (a model directory,
    'default', 'tiny', a hub id — `divrl.models.load_model` takes those)."""
    if not is_run_dir(spec):
        return spec
    found = latest_checkpoint(Path(spec))
    if found is None:
        raise FileNotFoundError(
            f"run directory '{spec}' has no complete checkpoint (checkpoints/step-N/ "
            f"whose files all match its {MANIFEST})"
        )
    return str(found[1])
