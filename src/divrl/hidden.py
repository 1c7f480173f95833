"""The hidden states that predict each completion token, for a batch of prompts × G completions
(design §4): each prompt is computed once for its G completions, in one packed sequence
(`divrl.packing`) or on its KV cache."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from divrl import attention, packing


@dataclass
class TokenBatch:
    """Completion tokens of some sequences, flattened (design §4): hidden states that predict
    them, the tokens, and the completion (row) each belongs to."""

    hidden: torch.Tensor  # (n, H)
    tokens: torch.Tensor  # (n,)
    rows: torch.Tensor  # (n,) index into the completions given
    prompt: TokenBatch | None = None  # with_prompt: the positions predicting prompt tokens 2..L


# What one more bucket costs, in padded tokens. KV-cache path (a forward per bucket), 2-core AVX2
# EPYC: 128 and 256 (fewer, bigger buckets) were no faster, one bucket per micro-batch 10–35%
# slower. Packed path (an SDPA call per bucket and layer), 2-core AVX512-BF16 EPYC, a GRPO update's
# forward + backward, medians of 4: 8 as fast, 128 2% and one bucket 6% slower.
BUCKET_OVERHEAD_TOKENS = 32


def length_buckets(lengths: list[int], overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Rows grouped into buckets of similar length, each run as one padded forward: the split of
    the rows sorted by length that minimizes Σ_bucket (rows × longest) + overhead × buckets (exact,
    by dynamic programming over the sorted rows)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[i]: cost of the first i rows (longest first)
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for first in range(end):  # bucket = sorted rows first..end-1, the longest being `first`
            cost = best[first] + overhead + (end - first) * lengths[order[first]]
            if cost < best[end]:
                best[end], cut[end] = cost, first
    buckets, end = [], n
    while end:
        buckets.append(order[cut[end] : end])
        end = cut[end]
    return buckets[::-1]


def cache_with_layers(model: PreTrainedModel, make_layer: Callable[[], CacheLayerMixin]) -> DynamicCache:
    """The model's own DynamicCache, its plain full-attention layers made by `make_layer` instead
    (sliding-window and other special layers are kept as they are)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [make_layer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class PrefixedLayer(DynamicLayer):
    """One full-attention layer's KV in `completion_hidden`: a fixed prefix (the row's prompt, or
    nothing for the prompts' own forward) followed by the positions of the latest `update` only.
    An update replaces the previous one instead of appending to it, so a block's forward run again
    (activation checkpointing recomputes it in the backward, `divrl.recompute`) gets the KV of
    its first run."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self.prefix = (keys, values)
        if keys is not None:
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.prefix
        if keys is None:
            self.keys, self.values = key_states, value_states
        else:
            assert values is not None  # set together with the keys
            self.keys, self.values = torch.cat([keys, key_states], -2), torch.cat([values, value_states], -2)
        self.device, self.is_initialized = key_states.device, True
        return self.keys, self.values


def _prompt_cache_rows(model: PreTrainedModel, cache: DynamicCache, prompt_of: torch.Tensor) -> DynamicCache:
    """A new cache holding, for each given row, its prompt's KV (differentiable selection)."""
    rows = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        # transformers types a layer as possibly linear-attention (no KV; hybrid models, unsupported here)
        keys, values = layer.keys, layer.values  # type: ignore[union-attr]
        if keys is not None and keys.numel():  # a layer reusing another's KV has none
            assert values is not None  # set together with the keys
            keys, values = keys.index_select(0, prompt_of), values.index_select(0, prompt_of)
            if isinstance(layer, PrefixedLayer):
                rows.layers[index] = PrefixedLayer(keys, values)
            else:
                rows.update(keys, values, index)
    return rows


def left_pad(prompt_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of the prompts left-padded to the longest, on the CPU."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def completion_hidden(
    model: PreTrainedModel,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    with_prompt: bool = False,
    bucket_overhead: int = BUCKET_OVERHEAD_TOKENS,
) -> TokenBatch:
    """Hidden states that predict each completion token, computing every prompt once.

    `completions` are group-major: G = len(completions) / len(prompts) per prompt. The completions
    run without their last token, whose hidden state predicts nothing, and padding never reaches
    the vocabulary-sized output layer: only the hidden states of real completion tokens are kept.
    A model for which `attention.plain_sdpa` holds runs the prompts and completions as one packed
    sequence, attention in buckets of rows of similar length (`length_buckets`); any other runs the
    prompts (left-padded) first, then the completions on their prompt's KV cache, in padded buckets
    of similar length. Either way the G copies of a prompt cost one forward/backward instead of G,
    and gradients reach the prompt positions. `bucket_overhead` is the cost of one more bucket in
    padded tokens. `with_prompt` also keeps, in ``.prompt``, the hidden states that predict each
    prompt's tokens 2..L (rows = the prompt's index), computed once per prompt.
    """
    if not prompts or len(completions) % len(prompts) or not all(completions):
        raise ValueError(
            f"completion_hidden needs G ≥ 1 non-empty completions per prompt, group-major; got "
            f"{len(completions)} completions (lengths {[len(c) for c in completions]}) for {len(prompts)} prompts"
        )
    if attention.plain_sdpa(model):  # no padding: the pad token is not needed
        return _packed_hidden(model, prompts, completions, with_prompt, bucket_overhead)
    return _cached_hidden(model, prompts, completions, pad_token_id, with_prompt, bucket_overhead)


def _packed_hidden(
    model: PreTrainedModel, prompts: list[list[int]], completions: list[list[int]], with_prompt: bool, overhead: int
) -> TokenBatch:
    """`completion_hidden` on one packed sequence: the prompts, then the completions without their
    last token (`divrl.packing`)."""
    group, device = len(completions) // len(prompts), model.device
    inputs = [c[:-1] for c in completions]  # the last token predicts nothing
    prompt_starts = list(itertools.accumulate((len(p) for p in prompts), initial=0))
    input_starts = list(itertools.accumulate((len(ids) for ids in inputs), initial=prompt_starts[-1]))
    prompt_keys = [list(range(a, b)) for a, b in itertools.pairwise(prompt_starts)]
    rows = [(keys, 0) for keys in prompt_keys] + [
        (prompt_keys[r // group] + list(range(input_starts[r], input_starts[r + 1])), len(prompts[r // group]))
        for r in range(len(inputs))
    ]
    ids = [t for p in prompts for t in p] + [t for c in inputs for t in c]
    positions = [j for p in prompts for j in range(len(p))] + [
        len(prompts[r // group]) + j for r, c in enumerate(inputs) for j in range(len(c))
    ]
    body = cast(PreTrainedModel, model.base_model)  # typed nn.Module: the PreTrainedModel body (or the model)
    layout = packing.layout(rows, length_buckets([len(keys) for keys, _ in rows], overhead), device)
    states = body(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([positions], device=device),
        use_cache=False,
        divrl_layout=layout,  # to the attention function (`attention.SDPA` or `FLOAT32_SDPA`)
    ).last_hidden_state[0]
    # Token j of a completion is predicted by the state before it: its prompt's last for j = 0.
    predictors = [
        i
        for r in range(len(inputs))
        for i in (prompt_starts[r // group + 1] - 1, *range(input_starts[r], input_starts[r + 1]))
    ]
    tokens = torch.tensor([t for c in completions for t in c], dtype=torch.long, device=device)
    lengths = torch.tensor([len(c) for c in completions], device=device)
    batch = TokenBatch(
        states.index_select(0, torch.tensor(predictors, device=device)),
        tokens,
        torch.repeat_interleave(torch.arange(len(completions), device=device), lengths),
    )
    if with_prompt:  # prompt position j predicts token j + 1
        places = [i for keys in prompt_keys for i in keys[:-1]]
        batch.prompt = TokenBatch(
            states.index_select(0, torch.tensor(places, dtype=torch.long, device=device)),
            torch.tensor([t for p in prompts for t in p[1:]], dtype=torch.long, device=device),
            torch.tensor([i for i, p in enumerate(prompts) for _ in p[1:]], dtype=torch.long, device=device),
        )
    return batch


def _cached_hidden(
    model: PreTrainedModel,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    with_prompt: bool,
    bucket_overhead: int,
) -> TokenBatch:
    """`completion_hidden` on KV caches: the prompts (left-padded) run first, then the completions
    on their prompt's KV cache (selected per row, differentiably), in buckets of similar length."""
    group = len(completions) // len(prompts)
    device = model.device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_token_id))
    width = prompt_ids.shape[1]
    # One embedding lookup for every token, so its backward builds one vocabulary-sized gradient,
    # not one per forward; the buckets gather their rows from it (a zero row for padding).
    inputs = [c[:-1] for c in completions]  # the last token predicts nothing
    flat = torch.tensor([t for ids in inputs for t in ids], dtype=torch.long, device=device)
    body = cast(PreTrainedModel, model.base_model)  # typed nn.Module: the PreTrainedModel body (or the model)
    embedded = body.get_input_embeddings()(torch.cat([prompt_ids.flatten(), flat]))
    prompt_embeds = embedded[: prompt_ids.numel()].view(*prompt_ids.shape, -1)
    comp_embeds = torch.cat([embedded[prompt_ids.numel() :], embedded.new_zeros(1, embedded.shape[-1])])
    input_starts = torch.tensor([0, *(len(ids) for ids in inputs)]).cumsum(0)[:-1].to(device)
    cache = cache_with_layers(model, PrefixedLayer)
    prompt_states = body(
        inputs_embeds=prompt_embeds,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
        cache=cache,
        use_cache=True,
    ).last_hidden_state
    prompt_lens = prompt_mask.sum(1)

    # Token j of a completion is predicted by the hidden state before it: the prompt's last one
    # for j = 0, the completion's (j − 1)-th otherwise. `values` gathers them bucket by bucket,
    # `places` their index in the output (row-major over the completions as given).
    lengths = [len(c) for c in completions]
    starts = torch.tensor([0, *lengths]).cumsum(0)[:-1].to(device)
    all_rows = torch.arange(len(completions), device=device)
    values = [prompt_states[:, -1].index_select(0, all_rows // group)]
    places = [starts]
    for bucket in length_buckets([len(ids) for ids in inputs], bucket_overhead):
        comp_width = max(len(inputs[r]) for r in bucket)
        if comp_width == 0:
            continue
        members = torch.tensor(bucket, device=device)
        prompt_of = members // group
        lens = torch.tensor([len(inputs[r]) for r in bucket], device=device)
        columns = torch.arange(comp_width, device=device)
        comp_mask = (columns[None, :] < lens[:, None]).long()
        gather = torch.where(
            comp_mask.bool(), input_starts.index_select(0, members)[:, None] + columns[None, :], len(comp_embeds) - 1
        )
        bucket_cache = _prompt_cache_rows(model, cache, prompt_of)
        hidden = body(
            inputs_embeds=comp_embeds[gather],
            attention_mask=torch.cat([prompt_mask.index_select(0, prompt_of), comp_mask], 1),
            position_ids=prompt_lens.index_select(0, prompt_of)[:, None] + columns[None, :],
            cache=bucket_cache,
            use_cache=True,
        ).last_hidden_state
        if bucket_cache.get_seq_length() != width + comp_width:  # e.g. gradient checkpointing in train mode
            raise RuntimeError(
                f"the KV cache holds {bucket_cache.get_seq_length()} positions after the "
                f"completions, not prompt + completion = {width + comp_width}: the model "
                f"dropped its cache (transformers does under gradient checkpointing in "
                f"train mode), so completions would not see their prompts"
            )
        real = comp_mask.bool()
        values.append(hidden[real])
        places.append((starts.index_select(0, members)[:, None] + 1 + columns[None, :])[real])
    order = torch.cat(places).argsort()
    tokens = torch.tensor([t for c in completions for t in c], dtype=torch.long, device=device)
    rows = torch.repeat_interleave(all_rows, torch.tensor(lengths, device=device))
    prompt = None
    if with_prompt:  # (left-padded) position j predicts token j + 1 when both are real
        predicts = (prompt_mask[:, :-1] * prompt_mask[:, 1:]).bool()
        p_rows, p_cols = predicts.nonzero(as_tuple=True)
        prompt = TokenBatch(prompt_states[p_rows, p_cols], prompt_ids[p_rows, p_cols + 1], p_rows)
    return TokenBatch(torch.cat(values).index_select(0, order), tokens, rows, prompt)
