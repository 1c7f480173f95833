"""A Llama decode step as plain tensor operations: what the CPU sampler runs instead of the model's
forward, the same arithmetic in fewer operations.

transformers' forward of one new token a row makes ~13 module calls and ~40 small operators a
layer (a mask built, RMSNorm as six operators, the attention function looked up), and the packed
linears (`rollout.packed_linears`) cast the input that q, k and v share to bf16 three times and
each output back to float32. Here a layer is the same arithmetic: RMSNorm fused (`F.rms_norm`); a
normalized input cast once for the linears that read it; a linear's output left in its dtype where
the next operator reads it into float32 anyway (the rotary embedding, the residual add, the
activation); the key and value stored by the sampler's cache layer; attention by
`attention.one_query`, as the model's own SDPA function computes a CPU decode step. Measured on
a 2-core AVX512-BF16 EPYC, 32 rows of SmolLM2-135M under bf16 autocast (4 prompts × 8, 8 runs a
side, alternating): 2.03–2.21 s to 64 tokens against 2.18–2.27 through the forward, 1.69–1.85 s
against 1.82–2.02 stopping at EOS; the same tokens and log-probs, bit for bit.

Only for a model whose forward this repeats (`supports`): transformers' LlamaForCausalLM, built
from its own layer, attention, MLP and RMSNorm classes with plain ``nn.Linear`` projections (a LoRA
wrapper is not one), float32 weights and divrl's SDPA attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama import modeling_llama as llama

from divrl import attention


def _rms_norm(norm: llama.LlamaRMSNorm, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _is_plain_layer(layer: nn.Module) -> bool:
    if type(layer) is not llama.LlamaDecoderLayer:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return (
        type(attn) is llama.LlamaAttention
        and type(mlp) is llama.LlamaMLP
        and type(layer.input_layernorm) is llama.LlamaRMSNorm
        and type(layer.post_attention_layernorm) is llama.LlamaRMSNorm
        and all(type(p) is nn.Linear for p in projections)
    )


def supports(model: PreTrainedModel) -> bool:
    """Whether `next_logits` computes `model`'s own decode step (see the module docstring)."""
    return (
        type(model) is llama.LlamaForCausalLM
        and model.dtype == torch.float32
        and type(model.lm_head) is nn.Linear
        and type(model.model.norm) is llama.LlamaRMSNorm
        and attention.plain_sdpa(model)
        and all(_is_plain_layer(layer) for layer in model.model.layers[: model.config.num_hidden_layers])
    )


def next_logits(
    model: PreTrainedModel,
    cache,
    tokens: torch.Tensor,
    position: torch.Tensor,
    mask: torch.Tensor,
    linear_dtype: torch.dtype,
) -> torch.Tensor:
    """float32 logits (rows, vocab) of the position after `tokens` (rows,), at `position` (rows, 1),
    attending the keys that `mask` (rows, keys, nonzero: attend) opens; `cache` (the sampler's, one
    `rollout._BufferLayer` a layer) gets each layer's new key and value. `linear_dtype` is the
    dtype the model's linears compute in (their input is cast to it, as they would cast it)."""
    inner = model.model
    x = inner.embed_tokens(tokens[:, None])  # (rows, 1, hidden), float32: the residual stream
    cos, sin = inner.rotary_emb(x, position_ids=position)
    attend = mask[:, None, None, :].bool()
    for layer, cache_layer in zip(inner.layers[: model.config.num_hidden_layers], cache.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = _rms_norm(layer.input_layernorm, x).to(linear_dtype)
        heads = (len(tokens), 1, -1, attn.head_dim)
        q, k = (proj(h).view(heads).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))
        q, k = llama.apply_rotary_pos_emb(q, k, cos, sin)  # float32 from here, as the forward's
        keys, values = cache_layer.update(k, attn.v_proj(h).view(heads).transpose(1, 2))
        out = attention.one_query(q, keys, values, attend, attn.scaling)
        x = x + attn.o_proj(out.reshape(len(tokens), 1, -1).to(linear_dtype))
        h = _rms_norm(layer.post_attention_layernorm, x).to(linear_dtype)
        x = x + mlp.down_proj((mlp.act_fn(mlp.gate_proj(h).float()) * mlp.up_proj(h)).to(linear_dtype))
    return model.lm_head(_rms_norm(inner.norm, x).to(linear_dtype))[:, -1].float()
