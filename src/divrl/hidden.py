"""The hidden states that predict each completion token, for a batch of prompts × G completions
(design §4): the prompt is run once and its KV cache repeated for its G completions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class TokenBatch:
    """Completion tokens of some sequences, flattened (design §4): hidden states that predict
    them, the tokens, and the completion (row) each belongs to."""

    hidden: torch.Tensor  # (n, H)
    tokens: torch.Tensor  # (n,)
    rows: torch.Tensor  # (n,) index into the completions given
    prompt: "TokenBatch | None" = None  # with_prompt: the positions predicting prompt tokens 2..L


def completion_hidden(model, prompts: list[list[int]], completions: list[list[int]],
                      pad_token_id: int, with_prompt: bool = False) -> TokenBatch:
    """Hidden states that predict each completion token, computing every prompt once.

    `completions` are group-major: G = len(completions) / len(prompts) per prompt. The prompts
    (left-padded) run first and their KV cache is repeated G times — differentiably, so gradients
    reach the prompt positions — then the completions (right-padded) run on top of it. The G
    copies of a prompt cost one forward/backward instead of G. Padding never reaches the
    vocabulary-sized output layer: only the hidden states of real completion tokens are kept.
    `with_prompt` also keeps, in ``.prompt``, the hidden states that predict each prompt's tokens
    2..L (rows = the prompt's index), computed once per prompt.
    """
    group = len(completions) // len(prompts)
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for row, prompt in enumerate(prompts):
        prompt_ids[row, width - len(prompt):] = torch.tensor(prompt)
        prompt_mask[row, width - len(prompt):] = 1
    cache = DynamicCache(config=model.config)
    body = model.base_model
    prompt_states = body(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0), cache=cache,
                         use_cache=True).last_hidden_state
    prompt_hidden = prompt_states[:, -1]
    cache.batch_repeat_interleave(group)

    lengths = torch.tensor([len(c) for c in completions])
    comp_width = int(lengths.max())
    comp_ids = torch.full((len(completions), comp_width), pad_token_id, dtype=torch.long)
    for row, completion in enumerate(completions):
        comp_ids[row, :len(completion)] = torch.tensor(completion)
    comp_mask = (torch.arange(comp_width)[None, :] < lengths[:, None]).long()
    prompt_lens = prompt_mask.sum(1).repeat_interleave(group)
    comp_hidden = body(input_ids=comp_ids,
                       attention_mask=torch.cat([prompt_mask.repeat_interleave(group, 0),
                                                 comp_mask], 1),
                       position_ids=prompt_lens[:, None] + torch.arange(comp_width)[None, :],
                       cache=cache, use_cache=True).last_hidden_state
    if cache.get_seq_length() != width + comp_width:  # e.g. gradient checkpointing in train mode
        raise RuntimeError(f"the KV cache holds {cache.get_seq_length()} positions after the "
                           f"completions, not prompt + completion = {width + comp_width}: the model "
                           f"dropped its cache (transformers does under gradient checkpointing in "
                           f"train mode), so completions would not see their prompts")
    # Token j of a completion is predicted by the hidden state before it: the prompt's last one
    # for j = 0, the completion's (j − 1)-th otherwise.
    predictors = torch.cat([prompt_hidden.repeat_interleave(group, 0)[:, None], comp_hidden[:, :-1]], 1)
    rows = torch.repeat_interleave(torch.arange(len(completions)), lengths)
    cols = torch.cat([torch.arange(int(n)) for n in lengths])
    prompt = None
    if with_prompt:  # (left-padded) position j predicts token j + 1 when both are real
        predicts = (prompt_mask[:, :-1] * prompt_mask[:, 1:]).bool()
        p_rows, p_cols = predicts.nonzero(as_tuple=True)
        prompt = TokenBatch(prompt_states[p_rows, p_cols], prompt_ids[p_rows, p_cols + 1], p_rows)
    return TokenBatch(predictors[rows, cols], comp_ids[rows, cols], rows, prompt)
