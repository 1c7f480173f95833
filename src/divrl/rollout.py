"""Sample G completions per prompt from a causal LM, the way a GRPO step needs them.

Each unique prompt is prefilled once and its KV cache is expanded G times; rows leave the
batch as soon as they sample a stop token. Sampling draws from softmax(logits / T), optionally
restricted to the top-p nucleus, i.e. the same distribution as HF ``generate(do_sample=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Rollout:
    """Completions of a batch of prompts, group-major: completions of prompt i are rows i*G .. i*G+G-1."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # P*G rows, unpadded; ends with the stop token if the row stopped
    finished: list[bool]  # P*G: True if the row ended on a stop token, False if cut at max_new_tokens
    group_size: int


def next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one token per row from softmax(logits / T) restricted to the top-p nucleus.

    The nucleus is the smallest set of most probable tokens whose mass reaches top_p (Holtzman et
    al. 2020), the set HF's ``TopPLogitsWarper`` keeps. ``temperature == 0`` means greedy.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    probs = scaled.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _left_pad(prompt_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[list[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample ``group_size`` completions of each prompt (see module docstring)."""
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    device = model.device
    ids, mask = _left_pad(prompt_ids, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)

    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
    logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)
    cache.batch_repeat_interleave(group_size)
    mask = mask.repeat_interleave(group_size, dim=0)
    next_position = positions[:, -1:].repeat_interleave(group_size, dim=0) + 1

    n_rows = len(prompt_ids) * group_size
    completions: list[list[int]] = [[] for _ in range(n_rows)]
    finished = [False] * n_rows
    live = torch.arange(n_rows, device=device)  # original row index of each batch row
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)

    for step in range(max_new_tokens):
        tokens = next_tokens(logits, temperature, top_p, generator)
        for row, token in zip(live.tolist(), tokens.tolist()):
            completions[row].append(token)
        stopped = torch.isin(tokens, stops)
        for row in live[stopped].tolist():
            finished[row] = True
        if step == max_new_tokens - 1:
            break
        if stopped.any():
            keep = (~stopped).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            live, tokens, mask, next_position = live[keep], tokens[keep], mask[keep], next_position[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        out = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position, cache=cache, logits_to_keep=1
        )
        logits = out.logits[:, -1]
        next_position = next_position + 1

    return Rollout(
        prompt_ids=[list(p) for p in prompt_ids],
        completion_ids=completions,
        finished=finished,
        group_size=group_size,
    )
