"""Exact divergences to any target expression, a row chunk at a time.

`divrl.chunked` fuses a divergence to a plain model into tile kernels. This is the general path:
for ``chunk_rows`` tokens at a time it builds the (chunk × V) log-probs of the policy and of the
models a target needs, evaluates the target (`divrl.spec.Target`, any `divrl.targets`
expression) and the divergence (any `divrl.divergences` function) with autograd, and
checkpoints the chunk (``torch.utils.checkpoint``): only one chunk's vocabulary-sized tensors are
alive, forward or backward, and they are recomputed for the gradient. A new target or divergence
needs no new kernel. The target side carries no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from divrl.chunked import Head
from divrl.spec import Target

DEFAULT_CHUNK_ROWS = 64


@dataclass
class ModelOutputs:
    """One model's view of N flat tokens: the hidden states that predict them and its head."""

    hidden: torch.Tensor  # (N, H)
    head: Head
    token_logprobs: torch.Tensor | None = None  # (N,) log-probs of the batch's tokens, if precomputed
    token_entropy: torch.Tensor | None = None  # (N,) entropy at each token's position, if precomputed

    def detach(self) -> ModelOutputs:
        return ModelOutputs(self.hidden.detach(), self.head.detach())


def _policy_and_target(
    target: Target,
    policy: ModelOutputs,
    hidden: torch.Tensor,
    models: Mapping[str, ModelOutputs],
    rows: slice,
    tokens: torch.Tensor,
    advantages: torch.Tensor | None,
    rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log πθ (chunk, V) from the policy's ``hidden`` rows, log q (chunk, V) without gradient;
    ``self`` is the policy's own log-probs, detached). The supplied arguments are built only for a
    target that reads them."""
    policy_logprobs = policy.head.logits(hidden).log_softmax(-1)
    with torch.no_grad():
        logprobs = {"self": policy_logprobs.detach()}
        for name in target.models() - {"self"}:
            model = models[name]
            logprobs[name] = model.head.logits(model.hidden[rows]).log_softmax(-1)
        advantage = reward = token = None
        if "advantage" in target.supplied and advantages is not None:  # on the sampled token, 0 elsewhere
            advantage = torch.zeros_like(policy_logprobs).scatter_(
                -1, tokens[rows, None], advantages[rows, None].to(policy_logprobs.dtype)
            )
        if "reward" in target.supplied and rewards is not None:
            reward = rewards[rows, None].to(policy_logprobs.dtype)
        if "token" in target.supplied:
            token = torch.zeros_like(policy_logprobs, dtype=torch.bool).scatter_(-1, tokens[rows, None], True)
        logq = target.evaluate(logprobs, advantage, reward, token)
        return policy_logprobs, logq.to(policy_logprobs.dtype)


def divergence_to_target(
    divergence: Callable[..., torch.Tensor],
    target: Target,
    policy: ModelOutputs,
    models: Mapping[str, ModelOutputs],
    tokens: torch.Tensor,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    **params,
) -> torch.Tensor:
    """D(πθ, q) per token (N,), exact over the vocabulary, differentiable w.r.t. the policy.

    ``divergence(log p, log q, **params)`` reduces the last dim (a `divrl.divergences` function);
    ``models`` maps the target's model names to their outputs; ``advantages`` (N,) feeds `tilt`,
    ``rewards`` (N,) `reward_power` (each token's completion's).
    """

    def chunk_value(rows: slice, hidden: torch.Tensor) -> torch.Tensor:
        return divergence(
            *_policy_and_target(target, policy, hidden, models, rows, tokens, advantages, rewards), **params
        )

    return _by_row_chunks(chunk_value, policy, chunk_rows)


def _by_row_chunks(
    fn: Callable[[slice, torch.Tensor], torch.Tensor], policy: ModelOutputs, chunk_rows: int
) -> torch.Tensor:
    """cat over row chunks of fn(rows, policy.hidden[rows]) (chunk,); each chunk checkpointed when
    it carries gradient, so only one chunk's (chunk × V) tensors are alive, forward or backward."""
    n = policy.hidden.shape[0]
    differentiable = torch.is_grad_enabled() and (policy.hidden.requires_grad or policy.head.weight.requires_grad)
    values = []
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        hidden = policy.hidden[rows]
        values.append(checkpoint(fn, rows, hidden, use_reentrant=False) if differentiable else fn(rows, hidden))
    return torch.cat(values) if values else policy.hidden.new_zeros(0)


@torch.no_grad()
def target_logprob_at(
    target: Target,
    policy: ModelOutputs,
    models: Mapping[str, ModelOutputs],
    tokens: torch.Tensor,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """log q(y_t) (N,) of the sampled tokens under any target (for the sampled estimators)."""

    def chunk_value(rows: slice, hidden: torch.Tensor) -> torch.Tensor:
        _, logq = _policy_and_target(target, policy, hidden, models, rows, tokens, advantages, rewards)
        return logq.gather(-1, tokens[rows, None]).squeeze(-1)

    return _by_row_chunks(chunk_value, policy, chunk_rows)


def _top_p_entropy_of_logits(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Entropy of softmax(logits) restricted to its nucleus and renormalized (SIREN's top-p
    entropy): among the top_k most probable tokens, those whose cumulative probability (sorted,
    under the full softmax) is still below top_p; 0 where none is (one token holds ≥ top_p).
    top_p = 1 follows the official code's strict ``cumsum < top_p`` and so is not the plain entropy:
    the token whose running sum reaches 1 is dropped (uniform over 4 tokens: log 3 = 1.0986, not
    log 4 = 1.3863)."""
    probs = logits.softmax(-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1).values
    kept = top.cumsum(-1) < top_p
    mass = (top * kept).sum(-1, keepdim=True)
    q = torch.where(kept, top / mass.clamp_min(torch.finfo(top.dtype).tiny), 0.0)
    return -(q * torch.where(kept, q, 1.0).log()).sum(-1)


def top_p_entropy(
    policy: ModelOutputs, top_p: float, top_k: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """SIREN's top-p entropy H̃_t (N,) of the policy at each token, differentiable, a checkpointed
    row chunk at a time (only chunk × V alive). As the official code (Linn3a/siren,
    ``efficient_top_p_sampling``): probabilities of the full softmax, the top_k most probable
    tokens, kept while their running sum stays below top_p, renormalized."""

    def chunk_value(_: slice, hidden: torch.Tensor) -> torch.Tensor:
        return _top_p_entropy_of_logits(policy.head.logits(hidden), top_p, top_k)

    return _by_row_chunks(chunk_value, policy, chunk_rows)
