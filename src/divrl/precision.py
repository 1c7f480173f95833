"""The precision a model runs at (config key `dtype`); for 'auto', the faster one measured here.

bf16 autocast pays only where the machine multiplies bf16 natively, and the CPU flags do not say
whether it does: reported, one CPU (probably with AMX) ran bf16 matmuls ≈ 4× fp32, one with the
AVX512-BF16 flag but no AMX 0.6×; measured, an AVX2-only one (1024² matmuls) 1/146×. So 'auto' times the model's own
forward pass (no gradient) on a batch shaped like a training micro-batch (8 sequences × 64
tokens) at float32 and at bf16 autocast, in alternating rounds, and takes bf16 when it is at
least 10% faster. A bf16 pass that already took 3× the float32 one is not repeated. The verdict
is cached in ``$DIVRL_CACHE/precision.json`` under the machine (CPU model and flags, threads, torch version,
device) and the model (its config), so a machine pays the few seconds once per model.

Under bf16 autocast, attention may still compute in float32 (`divrl.attention`, config key
`attention_dtype`): 'auto' times a causal SDPA forward and backward at the model's attention shape
in both dtypes and takes float32 when it is at least 10% faster, cached likewise under the machine
and that shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from divrl.atomic import write_text_atomically
from divrl.models import cache_dir

BF16_GAIN = 0.9  # bf16 is chosen when its time ≤ this × float32's
GIVE_UP = 3.0  # a bf16 warm-up this many times slower than float32 ends the measurement
ROWS, TOKENS = 8, 64
ROUNDS = 3  # alternating float32 / bf16 rounds after the warm-ups
PRECISIONS = ("fp32", "bf16")
ATTENTION_DTYPES = ("float32", "bfloat16")


def cache_file() -> Path:
    return cache_dir() / "precision.json"


def cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) of this machine's CPU, from /proc/cpuinfo where there is one."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    return name or "unknown", set(flags)


def machine_key(device: torch.device) -> str:
    """What makes one machine's timings differ from another's."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        name, flags = cpu_info()
        hardware = f"{name} [{' '.join(sorted(f for f in flags if 'avx' in f or 'amx' in f or f == 'fma'))}]"
    return f"{device.type}: {hardware}; {torch.get_num_threads()} threads; torch {torch.__version__}"


def model_key(model: PreTrainedModel) -> str:
    """The model's architecture and size: its config without names and versions, nor what
    `save_pretrained` fills in (`architectures`: the class name stands for it; `dtype`: the
    measurement times both precisions itself)."""
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if not k.startswith("_") and k not in ("transformers_version", "name_or_path", "architectures", "dtype")
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{type(model).__name__}-{digest}"


def _forward_seconds(model: PreTrainedModel, ids: torch.Tensor, precision: str) -> float:
    autocast = torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        model(input_ids=ids, logits_to_keep=1)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    return time.perf_counter() - start


def measure(model: PreTrainedModel) -> dict[str, float]:
    """Seconds of one forward pass of ROWS × TOKENS random tokens at each precision: after a
    warm-up of each, the best of ROUNDS rounds that alternate float32 and bf16, so a burst of other
    work on the machine slows one round of both rather than every run of one (measured: a float32
    best-of-two taken while another training job ran read 0.34 s against the idle 0.02–0.04, and
    picked bf16 for a model that runs 4× slower in it). On a CPU, bf16 stops after its warm-up when
    that took GIVE_UP × float32's; on a GPU its warm-up is mostly one-time library set-up, so it
    always goes on."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (ROWS, TOKENS), generator=generator).to(model.device)
    _forward_seconds(model, ids, "fp32")
    fp32 = _forward_seconds(model, ids, "fp32")
    bf16 = _forward_seconds(model, ids, "bf16")  # its warm-up
    if bf16 >= GIVE_UP * fp32 and ids.device.type != "cuda":
        return {"fp32": fp32, "bf16": bf16}
    bf16 = math.inf
    for _ in range(ROUNDS):
        fp32 = min(fp32, _forward_seconds(model, ids, "fp32"))
        bf16 = min(bf16, _forward_seconds(model, ids, "bf16"))
    return {"fp32": fp32, "bf16": bf16}


def faster(seconds: dict[str, float]) -> str:
    return "bf16" if seconds["bf16"] <= BF16_GAIN * seconds["fp32"] else "fp32"


def _valid(entry: object, verdict: str, choices: tuple[str, ...]) -> bool:
    """Whether a cache entry is one this module wrote: its `verdict` one of `choices`, and a
    timing of each choice."""
    if not isinstance(entry, dict) or entry.get(verdict) not in choices:
        return False
    seconds = entry.get("seconds")
    return isinstance(seconds, dict) and all(isinstance(seconds.get(k), int | float) for k in choices)


def _cached(key: str, verdict: str, choices: tuple[str, ...], measured: Callable[[], dict]) -> tuple[dict, Path]:
    """The cache's entry under `key` if `_valid`, else `measured()` written there; and the cache's path."""
    path = cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):  # not a cache this module wrote: measured again, rewritten
        known = {}
    if not _valid(known.get(key), verdict, choices):
        known[key] = measured()
        write_text_atomically(path, json.dumps(known, indent=1))
    return known[key], path


def resolve(dtype: str, model: PreTrainedModel, log: Callable[[str], object] | None = None) -> str:
    """'bf16' or 'fp32' for config key `dtype`: 'bfloat16' and 'float32' as named; 'auto' the
    faster of the two for this model on this machine (cached; measured on first use)."""
    if dtype != "auto":
        return {"bfloat16": "bf16", "float32": "fp32"}[dtype]

    def measured() -> dict:
        seconds = measure(model)
        return {"precision": faster(seconds), "seconds": seconds}

    entry, path = _cached(f"{machine_key(model.device)} | {model_key(model)}", "precision", PRECISIONS, measured)
    if log is not None:
        s = entry["seconds"]
        log(
            f"dtype auto: {entry['precision']} (a forward of {ROWS}×{TOKENS} tokens took {s['fp32']:.3g} s at "
            f"fp32, {s['bf16']:.3g} s at bf16 autocast on this machine; cached in {path})"
        )
    return entry["precision"]


def _attention_shape(model: PreTrainedModel) -> tuple[int, int, int, int]:
    """(ROWS, heads, TOKENS, head dim) of the model's attention."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    return ROWS, heads, TOKENS, getattr(config, "head_dim", None) or config.hidden_size // heads


def _attention_seconds(q: torch.Tensor, dtype: torch.dtype) -> float:
    """Seconds of a causal SDPA forward and backward with q = k = v = `q` in `dtype`."""
    x = q.to(dtype).requires_grad_(True)
    start = time.perf_counter()
    torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True).sum().backward()
    if q.device.type == "cuda":
        torch.cuda.synchronize(q.device)
    return time.perf_counter() - start


def measure_attention(model: PreTrainedModel) -> dict[str, float]:
    """Seconds of a causal SDPA forward and backward at the model's attention shape (ROWS ×
    heads × TOKENS × head dim) in float32 and in bf16: after a warm-up of each, the best of ROUNDS
    alternating rounds (see `measure`)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(_attention_shape(model), generator=generator).to(model.device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    for dtype in dtypes.values():
        _attention_seconds(q, dtype)
    seconds = dict.fromkeys(dtypes, math.inf)
    for _ in range(ROUNDS):
        for name, dtype in dtypes.items():
            seconds[name] = min(seconds[name], _attention_seconds(q, dtype))
    return seconds


def resolve_attention(
    setting: str, precision: str, model: PreTrainedModel, log: Callable[[str], object] | None = None
) -> str:
    """'float32' or 'bfloat16', the dtype attention computes in (`divrl.attention`), for config
    key `attention_dtype` at `precision`: at 'fp32' always 'float32' (no autocast); at 'bf16'
    'float32' and 'bfloat16' as named, 'auto' float32 where its forward and backward measured at
    least 10% faster than bf16's at this model's attention shape on this machine (cached)."""
    if precision == "fp32":
        return "float32"
    if setting != "auto":
        return setting

    def measured() -> dict:
        seconds = measure_attention(model)
        choice = "float32" if seconds["float32"] <= BF16_GAIN * seconds["bfloat16"] else "bfloat16"
        return {"attention_dtype": choice, "seconds": seconds}

    q_shape = _attention_shape(model)
    entry, path = _cached(
        f"{machine_key(model.device)} | attention {q_shape}", "attention_dtype", ATTENTION_DTYPES, measured
    )
    if log is not None:
        s = entry["seconds"]
        log(
            f"attention_dtype auto: {entry['attention_dtype']} (attention forward and backward took "
            f"{s['float32'] * 1e3:.3g} ms in float32, {s['bfloat16'] * 1e3:.3g} ms in bf16 on this machine; "
            f"cached in {path})"
        )
    return entry["attention_dtype"]
