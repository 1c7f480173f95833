"""Attention over a packed sequence (issue 10): a micro-batch's prompts and completions laid end to
end as one sequence of T tokens, no padding and every prompt once, so every layer but attention
(the linear layers, norms, MLP: nearly all of the FLOPs) runs on one (T, hidden) matrix.

Attention alone sees the rows the sequence is made of. A row is a list of key positions in the
packed sequence and a context length c: its queries are its keys from the c-th on, and each sees
the keys up to itself (a prompt: its own tokens, c = 0; a completion: its prompt's tokens then its
own, c = the prompt's length). `attend` gathers each row's queries and keys, runs SDPA on
buckets of rows of similar length under the rows' causal mask, and puts the outputs back in packed
order; divrl's SDPA attention functions (`divrl.attention`) call it when a forward passes a
`Layout` as the keyword argument `divrl_layout`. Gathers and SDPA are differentiable, so
gradients reach every position, a prompt's from all of its completions.

Why: small matrices waste a CPU's matmul units. On a 2-core AVX512-BF16 EPYC, bf16 matmuls of
SmolLM2-135M's layer shapes ran at 300–550 GFLOP/s with 21–92 rows and 800–880 with 315–1460; a
GRPO micro-batch (2 prompts of 46–70 tokens, 16 completions of 3–64) run as one prompt forward plus
a forward per length bucket on the prompts' KV cache (`hidden`'s other path) had 21–378 rows per
matmul, packed ≈ 680. Forward + backward of the model body under bf16 autocast: 0.96 s against
1.35 s (median of 5).

Only plain full attention packs (`attention.plain_sdpa`): divrl's SDPA functions, no sliding window, no
logit softcapping. Other models take the KV-cache path.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import repeat_kv


@dataclass(frozen=True)
class _Bucket:
    """Rows attended in one SDPA call, padded to its longest row's queries and keys."""

    queries: torch.Tensor  # (rows × Lq,) packed position of each row's i-th query (0 where padding)
    keys: torch.Tensor  # (rows × Lk,) packed position of each row's j-th key (0 where padding)
    mask: torch.Tensor  # (rows, 1, Lq, Lk) bool: query i of the row sees key j
    real: torch.Tensor  # indices of the real queries among the rows × Lq


@dataclass(frozen=True)
class Layout:
    """How attention reads a packed sequence (`layout`), passed to every layer as the keyword
    argument `divrl_layout`."""

    buckets: tuple[_Bucket, ...]
    order: torch.Tensor  # packed position → its output among the buckets' real queries


def layout(rows: Sequence[tuple[Sequence[int], int]], buckets: Sequence[Sequence[int]], device) -> Layout:
    """The attention layout of `rows` — (key positions, context length) each, their queries
    covering every packed position exactly once — attended bucket by bucket (`buckets`: lists of
    row indices). A padded query sees key 0 only (every row has one), so no softmax row is empty;
    its output is dropped."""
    made: list[_Bucket] = []
    placed: list[int] = []
    for members in buckets:
        members = [m for m in members if len(rows[m][0]) > rows[m][1]]  # rows with queries
        if not members:
            continue
        n_queries = max(len(rows[m][0]) - rows[m][1] for m in members)
        n_keys = max(len(rows[m][0]) for m in members)
        queries = torch.zeros(len(members), n_queries, dtype=torch.long)
        keys = torch.zeros(len(members), n_keys, dtype=torch.long)
        context, real_queries, real_keys = (torch.zeros(len(members), dtype=torch.long) for _ in range(3))
        for i, m in enumerate(members):
            row_keys, row_context = rows[m]
            keys[i, : len(row_keys)] = torch.tensor(row_keys)
            queries[i, : len(row_keys) - row_context] = torch.tensor(row_keys[row_context:])
            context[i], real_queries[i], real_keys[i] = row_context, len(row_keys) - row_context, len(row_keys)
            placed.extend(row_keys[row_context:])
        q = torch.arange(n_queries)[None, :, None]
        k = torch.arange(n_keys)[None, None, :]
        real = q[..., 0] < real_queries[:, None]
        seen = (k <= context[:, None, None] + q) & (k < real_keys[:, None, None])
        mask = torch.where(real[:, :, None], seen, k == 0)
        made.append(
            _Bucket(
                queries.flatten().to(device),
                keys.flatten().to(device),
                mask[:, None].to(device),
                real.flatten().nonzero().squeeze(1).to(device),
            )
        )
    positions, order = torch.tensor(placed).sort()
    if not torch.equal(positions, torch.arange(len(placed))):
        raise ValueError("the rows' queries must cover the packed positions 0..T-1 once each")
    return Layout(tuple(made), order.to(device))


def _sdpa(q, k, v, mask, dropout: float, scale: float | None) -> torch.Tensor:
    """SDPA with grouped-query heads (k, v with fewer heads than q): on the CPU by SDPA's own
    `enable_gqa` (at a packed micro-batch's shapes, forward + backward 3.9 ms against 6.0 with
    the heads repeated; the same numbers), elsewhere on repeated heads, as transformers does
    with a mask (CUDA's fused kernels take `enable_gqa` only without one)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and q.device.type != "cpu":
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=groups > 1 and q.device.type == "cpu"
    )


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: Layout,
    dropout: float = 0.0,
    scaling: float | None = None,
    float32: bool = False,
) -> torch.Tensor:
    """SDPA over the rows of a packed sequence (q, k, v: (1, heads, T, head dim)), in float32 with
    autocast off if `float32` (cast before the gathers, which repeat a prompt's keys for each of
    its completions); the output is (1, T, heads, head dim) in the query's dtype, as
    transformers' attention functions return it."""
    with torch.autocast(query.device.type, enabled=False) if float32 else nullcontext():
        inputs = (query.float(), key.float(), value.float()) if float32 else (query, key, value)
        queries, keys, values = (x[0].transpose(0, 1) for x in inputs)  # (T, heads, head dim)
        out = []
        for bucket in layout.buckets:
            rows = bucket.mask.shape[0]
            q, k, v = (
                x.index_select(0, index).view(rows, -1, *x.shape[1:]).transpose(1, 2)
                for x, index in ((queries, bucket.queries), (keys, bucket.keys), (values, bucket.keys))
            )
            attended = _sdpa(q, k, v, bucket.mask, dropout, scaling)
            out.append(attended.transpose(1, 2).flatten(0, 1).index_select(0, bucket.real))
        return torch.cat(out).index_select(0, layout.order).to(query.dtype)[None]
