"""Attention in float32 inside a bf16 autocast (config key `attention_dtype`).

Under bf16 autocast, transformers' SDPA attention runs in bf16, and on a CPU that is not always
the faster choice: on a 2-core AVX512-BF16 EPYC (no AMX), torch's CPU flash attention took 9.5 ms
for a forward and backward of 8 × 9 heads × 63 queries × 109 keys in bf16 against 5.0 ms in
float32, while its matmuls ran 4.6× faster in bf16. Attention is a small share of the model's
FLOPs, so computing it in float32 (q, k, v cast up, the output cast back to the autocast dtype
for the output projection) keeps the bf16 linears and loses none of their speed.

`use(model, dtype)` points the model's config at the attention function registered here, which
is transformers' own SDPA attention (and its mask) with q, k, v in float32 and autocast off
inside; outside autocast (float32 inputs) it is SDPA itself. Which dtype is faster is measured
per machine (`precision.resolve_attention`), not read from the CPU flags.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FLOAT32_SDPA = "divrl_sdpa_float32"


def _sdpa_in_float32(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' SDPA attention computed in float32, its output in the query's dtype."""
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, *args, **kwargs
        )
    return out.to(query.dtype), weights


AttentionInterface.register(FLOAT32_SDPA, _sdpa_in_float32)
AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)


def use(model: PreTrainedModel, dtype: str) -> PreTrainedModel:
    """`model` (in place) with its SDPA attention computed in `dtype`: 'float32' through
    FLOAT32_SDPA, 'bfloat16' as autocast runs it (transformers' SDPA). A model whose attention is
    not SDPA (eager, flash attention) is left as it is."""
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    for config in configs:
        if dtype == "float32" and config._attn_implementation == "sdpa":
            config._attn_implementation = FLOAT32_SDPA
        elif dtype == "bfloat16" and config._attn_implementation == FLOAT32_SDPA:
            config._attn_implementation = "sdpa"
    return model
