"""Policy-gradient surrogates: the per-token loss ℓ_PG(t) of the objective, registered by name.

Each takes the tokens' `PolicyTokens` (log-probs with gradient, the behaviour policy's, the
completion's advantage, whether it passed, its group's pass rate) and its parameters, and returns
(loss (N,), clipped (N,) bool). `pg_loss` in the config names one:

==================================  ==================================================================
name (params)                       ℓ_PG(t), ρ_t = πθ(y_t|s_t)/πold(y_t|s_t)
==================================  ==================================================================
``clipped`` (clip_low, clip_high)   −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A)  (PPO; GRPO, DAPO)
``reinforce``                       −A·log πθ(y_t): advantage-weighted cross-entropy, no ratio (offline
                                    REINFORCE on stored rollouts; ReasonMaxxer)
``trrd`` (alpha, clip_low,          the clipped surrogate with the ratio's denominator the geometric
clip_high, teacher_clamp)           anchor πold^α·π_T^{1−α} of the sampled token (TRRD / RLAD)
``gdsd`` (psi, epsilon)             (clip(log πθ(y)/πold(y), log(1 ∓ ε))/|y| − ψA)² per completion:
                                    regression onto the advantage-tilted self-teacher (GDSD)
``nft`` (epsilon, clamp,            (1 − r̂)·[−1_pass log ρ_t − w_neg·1_fail log max_ST((1 − r̂ρ_t)/(1 − r̂), ε)]
negative_weight)
==================================  ==================================================================

NFT (Chen et al. 2025, "Bridging Supervised Learning and Reinforcement Learning in Math
Reasoning", arXiv 2505.18116; read in the official code NVlabs/NFT, `dp_actor.py` and
`train_7B.sh`): r̂ = the group pass rate clamped to [clamp, 1 − clamp] (0.02); ρ_t =
exp(min(log ρ_t, 10)); a passing completion is trained by likelihood, a failing one through the
implicit negative policy (1 − r̂ρ)/(1 − r̂), weighted by w_neg (1; 0 gives rejection-sampling
fine-tuning); max_ST clamps the value at ε (clamp_negative = 1.0 in the script) but keeps the
unclamped gradient (straight-through); (1 − r̂) is the code's prompt weight ("normalize = 1").
At ρ = 1 its per-token gradient weights are −(1 − r̂) (pass) and +r̂ (fail): REINFORCE with the
group-mean baseline on 0/1 rewards, i.e. Dr. GRPO's gradient (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PolicyTokens:
    logprobs: Tensor  # (N,) policy log-prob of the sampled token, with gradient
    old_logprobs: Tensor  # (N,) behaviour policy, detached
    advantages: Tensor  # (N,) the token's completion's advantage
    passed: Tensor  # (N,) bool: the token's completion passed (full score)
    group_pass_rate: Tensor  # (N,) pass rate of the token's group
    rows: Tensor | None = None  # (N,) long: the token's completion (sequence-level surrogates)
    teacher_logprobs: Tensor | None = None  # (N,) log π_T(y_t|s_t), for surrogates that read it


Surrogate = Callable[..., tuple[Tensor, Tensor]]
_SURROGATES: dict[str, Surrogate] = {}
READS_TEACHER: set[str] = set()  # surrogates that read the teacher's log-probs of the sampled tokens


def register_surrogate(name: str, reads_teacher: bool = False) -> Callable[[Surrogate], Surrogate]:
    def register(fn: Surrogate) -> Surrogate:
        _SURROGATES[name] = fn
        if reads_teacher:
            READS_TEACHER.add(name)
        return fn

    return register


def names() -> list[str]:
    return sorted(_SURROGATES)


def get(name: str) -> Surrogate:
    if name not in _SURROGATES:
        raise ValueError(f"unknown pg_loss {name!r}; valid: {', '.join(names())}")
    return _SURROGATES[name]


@register_surrogate("clipped")
def clipped(tokens: PolicyTokens, clip_low: float = 0.2, clip_high: float = 0.28) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate −min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A) and where the clip bit."""
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"clipped: need 0 ≤ clip_low < 1 and clip_high ≥ 0, got {clip_low}, {clip_high}")
    ratio = torch.exp(tokens.logprobs - tokens.old_logprobs)
    unclipped = ratio * tokens.advantages
    clipped_ = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * tokens.advantages
    return -torch.minimum(unclipped, clipped_), (clipped_ < unclipped).detach()


def _clamp_min_straight_through(x: Tensor, low: float) -> Tensor:
    """Value max(x, low), gradient of x."""
    return x + (x.clamp(min=low) - x).detach()


@register_surrogate("nft")
def nft(
    tokens: PolicyTokens, epsilon: float = 1.0, clamp: float = 0.02, negative_weight: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Negative-aware fine-tuning's per-token loss (module docstring), and where ε clamped."""
    if not (epsilon > 0 and 0 < clamp < 0.5 and negative_weight >= 0):
        raise ValueError(
            f"nft: need epsilon > 0, 0 < clamp < 0.5 and negative_weight ≥ 0, got {epsilon}, {clamp}, {negative_weight}"
        )
    rate = tokens.group_pass_rate.clamp(clamp, 1 - clamp).to(tokens.logprobs.dtype)
    log_ratio = (tokens.logprobs - tokens.old_logprobs).clamp(max=10.0)
    implicit_negative = (1 - rate * log_ratio.exp()) / (1 - rate)
    clamped = (implicit_negative < epsilon).detach()
    negative = torch.log(_clamp_min_straight_through(implicit_negative, epsilon))
    loss = (1 - rate) * torch.where(tokens.passed, -log_ratio, -negative_weight * negative)
    return loss, clamped & ~tokens.passed


@register_surrogate("reinforce")
def reinforce(tokens: PolicyTokens) -> tuple[Tensor, Tensor]:
    """−A·log πθ(y_t), no importance ratio and no clip: the advantage-weighted cross-entropy that
    ReasonMaxxer (arXiv 2605.06241, authors' code) trains on base-model rollouts stored once. On
    policy its gradient equals the clipped surrogate's at ρ = 1; off policy it ignores πold."""
    return -tokens.advantages * tokens.logprobs, torch.zeros_like(tokens.logprobs, dtype=torch.bool)


@register_surrogate("trrd", reads_teacher=True)
def trrd(
    tokens: PolicyTokens, alpha: float = 0.5, clip_low: float = 0.2, clip_high: float = 0.28, teacher_clamp: float = 1.0
) -> tuple[Tensor, Tensor]:
    """TRRD's clipped surrogate (RLAD, "Reinforcement-aware Knowledge Distillation for LLM
    Reasoning", arXiv 2602.22495 v2, Eqs. 3–4 and App. A–C; methods notes): the PPO ratio with the
    geometric anchor πold^α·π_T^{1−α} of the sampled token as denominator,
    log r_t = α·(log πθ − log πold) + (1 − α)·clamp(log πθ − log π_T, −c, c), c = teacher_clamp = 1
    (App. B), and −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A). α = 1 is GRPO's ratio exactly;
    α → 0 anchors on the teacher. Paper: α = 0.5, ε = 0.20/0.28."""
    if not (0 <= alpha <= 1 and 0 <= clip_low < 1 and clip_high >= 0 and teacher_clamp > 0):
        raise ValueError(
            f"trrd: need 0 ≤ alpha ≤ 1, 0 ≤ clip_low < 1, clip_high ≥ 0 and teacher_clamp > 0, "
            f"got {alpha}, {clip_low}, {clip_high}, {teacher_clamp}"
        )
    if tokens.teacher_logprobs is None:
        raise ValueError("trrd: needs the teacher's log-probs of the sampled tokens (set 'teacher')")
    teacher_term = (tokens.logprobs - tokens.teacher_logprobs.to(tokens.logprobs.dtype)).clamp(
        -teacher_clamp, teacher_clamp
    )
    log_ratio = alpha * (tokens.logprobs - tokens.old_logprobs) + (1 - alpha) * teacher_term
    ratio = torch.exp(log_ratio)
    unclipped = ratio * tokens.advantages
    clipped_ = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * tokens.advantages
    return -torch.minimum(unclipped, clipped_), (clipped_ < unclipped).detach()


@register_surrogate("gdsd")
def gdsd(tokens: PolicyTokens, psi: float = 10.0, epsilon: float = 0.2) -> tuple[Tensor, Tensor]:
    """GDSD's normalization-free regression onto the advantage-tilted self-teacher q ∝ πold·exp(ψA)
    (arXiv, "Guided Denoiser Self-Distillation"; official code GaryBall/GDSD,
    `gdsd_trainer_batchll.py`; methods notes), in its autoregressive form: per completion,
    ℓ_i = (clip(log πθ(y_i) − log πold(y_i), log(1 − ε), log(1 + ε))/|y_i| − ψ·A_i)²,
    log π(y) the sum over the completion's tokens. Returned on each of the completion's tokens, so
    seq_mean_token_mean aggregation gives mean_i ℓ_i. Its zero-residual point is
    log πθ/πold = ψ·A per completion: the tilt, up to normalization. Code: ψ = 10; ε not read (0.2)."""
    if not (psi > 0 and 0 < epsilon < 1):
        raise ValueError(f"gdsd: need psi > 0 and 0 < epsilon < 1, got {psi}, {epsilon}")
    if tokens.rows is None:
        raise ValueError("gdsd: needs the tokens' completions (rows)")
    n = int(tokens.rows.max()) + 1 if len(tokens.rows) else 0
    log_ratio = torch.zeros(n, dtype=tokens.logprobs.dtype, device=tokens.rows.device).index_add(
        0, tokens.rows, tokens.logprobs - tokens.old_logprobs
    )
    length = torch.zeros(n, dtype=tokens.logprobs.dtype, device=tokens.rows.device).index_add(
        0, tokens.rows, torch.ones_like(tokens.logprobs)
    )
    bounded = log_ratio.clamp(math.log(1 - epsilon), math.log(1 + epsilon))
    advantage = torch.zeros(n, dtype=tokens.advantages.dtype, device=tokens.rows.device).index_add(
        0, tokens.rows, tokens.advantages
    )
    loss = (bounded / length.clamp(min=1) - psi * advantage / length.clamp(min=1)) ** 2  # A_i: its tokens' mean
    return loss[tokens.rows], (bounded != log_ratio).detach()[tokens.rows]
