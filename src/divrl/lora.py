"""LoRA (config key `lora`): train low-rank adapters (`peft`) instead of all the policy's weights.

`apply` injects peft's LoRA layers into the loaded model in place (``peft.get_peft_model``, whose
wrapper is dropped: the trainer keeps the transformers model, so ``model.base_model``,
``output_head``, ``completion_hidden`` and generation work as without LoRA) and freezes every
other weight. The output head and the input embedding are never adapted (divrl reads the head's
weight directly, `divrl.models.output_head`, so an adapted head would be silently ignored).

The reference. With the adapters disabled the policy *is* its initial weights, so the default
reference (a frozen copy of the initial policy) is `AdaptersOff(policy)`: the same model, its
adapters switched off around each reference forward (`forward_of`), no second copy in memory.
Where the reference is not the initial policy — `reference_refresh_every` (the policy at the last
refresh), behaviour cloning (π_BC), an explicit `reference` — it stays a separate model.

Checkpoints of a LoRA run (`divrl.checkpoint`) hold the adapter as peft writes it
(`adapter_config.json`, `adapter_model.safetensors`: ``PeftModel.from_pretrained(base, dir)``
loads it), `lora_base.json` (the base model's spec and seed, so `divrl.models.load_model` can
rebuild base + adapter from the checkpoint directory alone) and, with `lora.save_merged`, a merged
`from_pretrained`-loadable model in `merged/`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "lora_base.json"
MERGED_DIR = "merged"
PEFT_PREFIX = "base_model.model."  # a PeftModel's parameter names: this + the wrapped model's
ADAPTER = "default"  # peft's name of the (only) adapter
KEYS = ("r", "alpha", "dropout", "target_modules", "save_merged")


@dataclass(frozen=True)
class LoraSpec:
    """Config key `lora`: {r, alpha, dropout, target_modules, save_merged}."""

    r: int = 16
    alpha: float = 32.0  # the update is (alpha / r) · B A
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"  # peft's: every linear layer but the output head
    save_merged: bool = False  # also write checkpoints/step-N/merged/ (from_pretrained-loadable)

    @classmethod
    def parse(cls, value: dict | None) -> LoraSpec | None:
        """From config key `lora` (a mapping or null); ValueError names the bad entry as `'lora.<key>' …`."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(
                f"'lora' must be a mapping {{r, alpha, dropout, target_modules, save_merged}} or null, got {value!r}"
            )
        for key in value:
            if key not in KEYS:
                raise ValueError(f"'lora.{key}' is unknown; lora takes {', '.join(KEYS)}")
        spec = cls(**value)

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ValueError(f"'lora.{key}' {what}, got {getattr(spec, key)!r}")

        need(isinstance(spec.r, int) and not isinstance(spec.r, bool) and spec.r >= 1, "r", "must be an integer ≥ 1")
        need(
            isinstance(spec.alpha, int | float)
            and not isinstance(spec.alpha, bool)
            and math.isfinite(spec.alpha)
            and spec.alpha > 0,
            "alpha",
            "must be a number > 0",
        )
        need(
            spec.dropout == 0,
            "dropout",
            "must be 0: divrl runs the policy in eval mode (no dropout anywhere, so the model that "
            "samples is the model that is trained), where LoRA dropout would never apply",
        )
        targets = spec.target_modules
        need(
            (isinstance(targets, str) and targets != "")
            or (isinstance(targets, list) and bool(targets) and all(isinstance(t, str) and t for t in targets)),
            "target_modules",
            "must be a module name pattern, a non-empty list of module names, or 'all-linear'",
        )
        need(isinstance(spec.save_merged, bool), "save_merged", "must be true or false")
        return cls(**{**value, "alpha": float(spec.alpha)})


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA model carries (as `model.divrl_lora`): its spec, and the base it was built on."""

    spec: LoraSpec
    base: str  # the `model` spec: 'default', 'tiny', a directory (made absolute) or a hub id
    seed: int  # the base's weight seed ('tiny')


def info(model) -> LoraInfo | None:
    """The model's LoRA settings where `apply` gave it adapters, else None."""
    return getattr(model, "divrl_lora", None)


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("config key 'lora' needs the package peft: pip install 'divrl[lora]'") from None
    return peft


def apply(model, spec: LoraSpec, base: str, seed: int):
    """`model` with LoRA adapters of `spec` injected in place (B = 0: it still computes the base
    model), every other weight frozen; returns the same model. ValueError where the targets match
    no layer, or include the output head or the input embedding."""
    peft = _peft()
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        bias="none",
    )
    unadapted = {"output head": model.get_output_embeddings(), "input embedding": model.get_input_embeddings()}
    try:
        peft.get_peft_model(model, config)  # injects into `model` itself; the PeftModel wrapper is not kept
    except ValueError as err:  # e.g. no module matches
        raise ValueError(f"'lora.target_modules' {spec.target_modules!r}: {err}") from None
    now = {"output head": model.get_output_embeddings(), "input embedding": model.get_input_embeddings()}
    for name, layer in unadapted.items():
        if now[name] is not layer:
            raise ValueError(
                f"'lora.target_modules' matches the {name}; divrl reads the output head's weight directly "
                f"(and ties it to the embedding in small models), so it must stay unadapted"
            )
    path = Path(base).expanduser()
    model.divrl_lora = LoraInfo(spec, str(path.resolve()) if path.exists() else base, seed)
    return model


def trainable(model) -> list[torch.nn.Parameter]:
    """The parameters an optimizer updates: the adapters' of a LoRA model."""
    return [p for p in model.parameters() if p.requires_grad]


def _tuner_layers(model) -> Iterator[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


class AdaptersOff:
    """The reference as the LoRA policy with its adapters disabled: the initial weights, without a
    second copy. Use it through `forward_of`."""

    def __init__(self, model):
        self.model = model

    @contextmanager
    def active(self) -> Iterator[Any]:
        layers = list(_tuner_layers(self.model))
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield self.model
        finally:
            for layer in layers:
                layer.enable_adapters(True)


def forward_of(model):
    """A context giving the model to run for a frozen model slot (reference, teacher): `model`
    itself, or, for `AdaptersOff`, the policy with its adapters off for the duration."""
    return model.active() if isinstance(model, AdaptersOff) else nullcontext(model)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's weights under a PeftModel's names (as ``PeftModel.save_pretrained`` writes them)."""
    peft = _peft()
    return {PEFT_PREFIX + k: v.detach().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}


def merged_copy(model):
    """A plain transformers model of `model`'s weights with its adapters merged in (a copy;
    `model` is unchanged)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for name, layer in list(merged.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()  # base weight += (alpha / r) · B A
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    for attribute in ("peft_config", "divrl_lora"):
        merged.__dict__.pop(attribute, None)
    merged.requires_grad_(False)
    return merged


def save_merged(model, directory: Path) -> None:
    """`directory`: the merged model (`merged_copy`), loadable with ``from_pretrained``."""
    merged_copy(model).save_pretrained(directory)


def save(model, directory: Path) -> None:
    """A LoRA model's part of a checkpoint: the adapter (peft's files), `lora_base.json` and, with
    `save_merged`, `merged/`."""
    from safetensors.torch import save_file

    lora = info(model)
    assert lora is not None, "lora.save needs a model given adapters by lora.apply"
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = copy.copy(model.peft_config[ADAPTER])
    config.base_model_name_or_path = lora.base
    config.save_pretrained(directory)
    (directory / BASE_FILE).write_text(json.dumps({"model": lora.base, "seed": lora.seed}))
    if lora.spec.save_merged:
        save_merged(model, directory / MERGED_DIR)


def load(model, directory: Path) -> None:
    """Set a LoRA model's adapter weights from a checkpoint `save` wrote; RuntimeError where they
    do not match its adapters."""
    from safetensors.torch import load_file

    peft = _peft()
    saved = load_file(directory / ADAPTER_WEIGHTS)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()}
    expected = set(peft.get_peft_model_state_dict(model))
    if set(state) != expected:
        raise RuntimeError(
            f"checkpoint {directory}: its adapter does not match the model's (lora.r or "
            f"lora.target_modules changed?): missing {sorted(expected - set(state))[:4]}, unexpected "
            f"{sorted(set(state) - expected)[:4]}"
        )
    with torch.no_grad():
        peft.set_peft_model_state_dict(model, state)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter_dir(path: str | Path, device: torch.device | str = "cpu"):
    """(model, tokenizer) of a LoRA checkpoint directory: its `merged/` model where there is one,
    else its base (`lora_base.json`) with the adapter merged in."""
    from transformers import AutoModelForCausalLM

    from divrl.models import ModelLoadError, load_model, load_tokenizer

    path = Path(path)
    if (path / MERGED_DIR / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path / MERGED_DIR, dtype=torch.float32)
        return model, load_tokenizer(path)
    if not (path / BASE_FILE).is_file():
        raise ModelLoadError(
            f"'{path}' holds a LoRA adapter but no {BASE_FILE} naming its base model (not written by "
            f"divrl); load it with peft.PeftModel.from_pretrained(base, '{path}')"
        )
    base = json.loads((path / BASE_FILE).read_text())
    model, tokenizer = load_model(base["model"], seed=base["seed"], device=device)
    peft = _peft()
    merged = peft.PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    if (path / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(path)
    return merged, tokenizer
