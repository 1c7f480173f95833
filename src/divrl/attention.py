"""Attention in float32 inside a bf16 autocast (config key `attention_dtype`).

Under bf16 autocast, transformers' SDPA attention runs in bf16, and on a CPU that is not always
the faster choice: on a 2-core AVX512-BF16 EPYC (no AMX), torch's CPU flash attention took 9.5 ms
for a forward and backward of 8 × 9 heads × 63 queries × 109 keys in bf16 against 5.0 ms in
float32, while its matmuls ran 4.6× faster in bf16. Attention is a small share of the model's
FLOPs, so computing it in float32 (q, k, v cast up, the output cast back to the autocast dtype
for the output projection) keeps the bf16 linears and loses none of their speed.

`use(model, dtype)` points the model's config at one of the two attention functions registered
here: `SDPA`, transformers' own SDPA attention (and its mask), and `FLOAT32_SDPA`, the same with
q, k, v in float32 and autocast off inside (outside autocast, float32 inputs, it is SDPA itself).
Which dtype is faster is measured per machine (`precision.resolve_attention`), not read from the
CPU flags. Both attend a packed sequence (`divrl.packing`) when a forward passes its layout as
the keyword argument `divrl_layout`; `load_model` gives every model it loads `SDPA`, so the
numbers are transformers' and a forward may pack.

A decode step without gradients on the CPU (one query position a row) attends through two
batched matmuls instead (`one_query`): the query heads of a key/value head stacked as rows, so a
(batch, key/value head) pair is one small matmul, where torch's CPU flash attention handles each
query head apart. At SmolLM2-135M's decode shape (32 rows, 9 query and 3 key/value heads, 100
keys, float32, caches cold across 30 layers) it took 250 µs a layer against 390 µs on a 2-core
AVX512-BF16 EPYC, and a 32-row rollout of 64 tokens (every row to the end) 2.54 s against 2.65 s
(median of 8; faster in each of the 8 pairs), of 192 tokens 8.29 s against 8.60 s; SDPA's result
to float32 rounding. The sampler's cache stores the keys transposed on the CPU (`rollout`), so
that kᵀ is a matrix of contiguous rows there.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from divrl import packing

SDPA = "divrl_sdpa"
FLOAT32_SDPA = "divrl_sdpa_float32"


def _packed(query, key, value, layout: packing.Layout, float32: bool, kwargs: dict) -> tuple[torch.Tensor, None]:
    return packing.attend(query, key, value, layout, kwargs.get("dropout", 0.0), kwargs.get("scaling"), float32), None


def one_query(query, key, value, attention_mask, scaling: float | None) -> torch.Tensor:
    """softmax(q kᵀ · scaling + mask) v for one query position a row, in transformers' output
    layout (batch, 1, heads, dim): query head h reads key/value head h // (heads / kv heads), as
    transformers' `repeat_kv` pairs them. `attention_mask` is None, boolean (True attends) or
    additive, of shape (batch, 1, 1, keys)."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scores = torch.matmul(query.reshape(batch, kv_heads, heads // kv_heads, dim), key.transpose(-1, -2))
    scores.mul_(dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = (
            scores.masked_fill_(~attention_mask, -math.inf)
            if attention_mask.dtype == torch.bool
            else scores.add_(attention_mask)
        )
    return torch.matmul(scores.softmax(dim=-1), value).reshape(batch, 1, heads, dim)


def _is_one_query_decode(query, attention_mask, kwargs: dict) -> bool:
    """A float32 CPU decode step, outside autocast, that `one_query` computes as SDPA would: no
    gradient, no dropout, softcap or position bias, a mask shared by a row's heads."""
    return (
        query.shape[2] == 1
        and query.device.type == "cpu"
        and query.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.is_grad_enabled()
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1)))
    )


def _unpacked(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' SDPA attention, or `one_query` at a CPU decode step."""
    if not args and _is_one_query_decode(query, attention_mask, kwargs):
        return one_query(query, key, value, attention_mask, kwargs.get("scaling")), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _sdpa(module: nn.Module, query, key, value, attention_mask, *args, divrl_layout=None, **kwargs):
    """`_unpacked`, or `packing.attend` given a packed layout."""
    if divrl_layout is not None:
        return _packed(query, key, value, divrl_layout, False, kwargs)
    return _unpacked(module, query, key, value, attention_mask, *args, **kwargs)


def _sdpa_in_float32(module: nn.Module, query, key, value, attention_mask, *args, divrl_layout=None, **kwargs):
    """`_sdpa` computed in float32 (autocast off), its output in the query's dtype."""
    if divrl_layout is not None:
        return _packed(query, key, value, divrl_layout, True, kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        out, weights = _unpacked(module, query.float(), key.float(), value.float(), attention_mask, *args, **kwargs)
    return out.to(query.dtype), weights


for _name, _function in ((SDPA, _sdpa), (FLOAT32_SDPA, _sdpa_in_float32)):
    AttentionInterface.register(_name, _function)
    AttentionMaskInterface.register(_name, sdpa_mask)


def _configs(model: PreTrainedModel) -> list:
    """The model's config and its text config, once each (they are one object for text models)."""
    return list({id(c): c for c in (model.config, model.config.get_text_config())}.values())


def use(model: PreTrainedModel, dtype: str = "bfloat16") -> PreTrainedModel:
    """`model` (in place) with its SDPA attention computed in `dtype`: 'float32' through
    FLOAT32_SDPA, 'bfloat16' as autocast runs it (SDPA: bf16 under bf16 autocast, float32
    outside). A model whose attention is not SDPA (eager, flash attention) is left as it is."""
    for config in _configs(model):
        if config._attn_implementation in ("sdpa", SDPA, FLOAT32_SDPA):
            config._attn_implementation = FLOAT32_SDPA if dtype == "float32" else SDPA
    return model


def other_layer_kinds(model: PreTrainedModel) -> list[str]:
    """The kinds of the model's attention layers other than plain full attention (sliding windows
    and the like), by their transformers cache-layer class names, sorted; [] when there are none."""
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    return sorted(kinds - {DynamicLayer.__name__})


def plain_sdpa(model: PreTrainedModel) -> bool:
    """Whether `model` attends through one of divrl's SDPA functions, every layer full attention (no
    sliding window), no attention logit softcapping: what a packed sequence (`divrl.packing`) and
    a static decode batch's 4D boolean mask (`rollout.sample`'s `static`) need."""
    return not other_layer_kinds(model) and all(
        config._attn_implementation in (SDPA, FLOAT32_SDPA) and getattr(config, "attn_logit_softcapping", None) is None
        for config in _configs(model)
    )
