"""The GRPO objective with a divergence penalty, on flat completion tokens.

Per token t of a completion with advantage A (design.md §1, with w = m = 1):

    ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β·D_t,   ρ_t = πθ(y_t|s_t) / πold(y_t|s_t)

aggregated as a token mean over the batch. Clip-higher (separate ε_high) is from DAPO (Yu et al.
2025); group-normalized advantages from GRPO (Shao et al. 2024); the mean-only advantage from
Dr. GRPO (Liu et al. 2025). D_t is the exact reverse KL over the vocabulary or a sampled estimator
from `divrl.divergences`.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Advantages of rewards laid out group-major (P·G,): r − mean_group, divided by the group's
    sample std (unbiased, as GRPO) when `normalize`. A group with equal rewards gets zeros."""
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        advantages: torch.Tensor, clip_low: float, clip_high: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate −min(ρA, clip(ρ)A) and whether the clip was active, shapes (N,)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).detach()
