"""Target distributions q built from other distributions, as pure functions on log-probabilities.

Inputs and outputs are **normalized log-probabilities** with any leading shape and the vocabulary
on the last dim, in the dtype given. Zero mass (−inf) is handled exactly: a token with zero mass
where the formula says so gets −inf, never NaN, and no gradient is NaN where the value is finite
(unsafe entries are replaced before the arithmetic — the "double where" of ``divrl.divergences``).
A position with no mass at all (an all −inf row, as ``extrapolate`` gives on disjoint supports)
stays all −inf through every function, with zero gradient, instead of normalizing to NaN. A NaN
input gives NaN in its own row only (unchecked here, as in ``divrl.divergences``).

===================================  ==================================================================
function                             log q
===================================  ==================================================================
``tilt(base, advantage, beta)``      log_softmax(base + A/β): q ∝ base·exp(A/β), the optimum of
                                     max_q E_q[A] − β KL(q‖base) (methods notes C1; Korbak et al. 2022,
                                     "RL with KL penalties is better viewed as Bayesian inference")
``extrapolate(ref, teacher, lam)``   log_softmax((1−λ)·ref + λ·teacher): q ∝ π_ref^{1−λ}·π_T^λ;
                                     λ = 0 ref, λ = 1 teacher, λ > 1 past the teacher (C7; G-OPD /
                                     ExOPD, "Learning beyond Teacher", arXiv 2602.12125)
``mix(a, b, alpha)``                 log((1−α)·eᵃ + α·eᵇ): the mixture (PS-KD's softened target)
``filter(p, min_p, relative)``       p with the tokens below min_p (or min_p·max p) removed, renormalized
                                     (min-p filtering; Lp-Reg's proxy, arXiv 2510.03222)
``temperature(p, T)``                log_softmax(p/T): q ∝ p^{1/T}
``reward_power(p, reward, floor)``   q ∝ p^φ(r), φ(r) = floor + (1 − floor)·clamp(r, 0, 1): the
                                     reference flattened on low-reward completions (RAPO's
                                     reward-aware reweighting, as the form read in secondary sources)
``uniform(p)``                       uniform over supp(p): KL(πθ‖uniform) = log|supp| − H(πθ)
``sampled_token()``                  the one-hot of the position's sampled (or demonstrated) token:
                                     forward_kl to it is the cross-entropy −log πθ(y_t) (PS-KD)
===================================  ==================================================================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_NEG_INF = -math.inf


def _log_normalized(logits: Tensor) -> Tensor:
    """log_softmax over the last dim; a row without mass (all −inf) stays all −inf, zero gradient."""
    no_mass = (logits == _NEG_INF).all(dim=-1, keepdim=True)
    return torch.log_softmax(logits.masked_fill(no_mass, 0.0), dim=-1).masked_fill(no_mass, _NEG_INF)


def tilt(base: Tensor, advantage: Tensor | float, beta: float) -> Tensor:
    """log q = log_softmax(base + A/β), i.e. q ∝ base·exp(A/β) (methods notes C1).

    The closed-form optimum of max_q E_q[A] − β·KL(q‖base); supp(q) = supp(base). ``advantage``
    is finite and broadcasts against ``base``: shape (..., V) for per-token rewards, (..., 1) for
    one value per position. β → ∞ gives base, β → 0 the argmax of A on supp(base).
    """
    if not beta > 0:
        raise ValueError(f"tilt: beta must be > 0, got {beta}")
    return _log_normalized(base + advantage / beta)


def extrapolate(ref: Tensor, teacher: Tensor, lam: float, normalized: bool = True) -> Tensor:
    """log q = log_softmax((1−λ)·ref + λ·teacher): q ∝ π_ref^{1−λ}·π_T^λ (methods notes C7).

    ``normalized=False`` returns (1−λ)·ref + λ·teacher itself, without log Z_t: G-OPD's dense
    per-token reward λ(log π_T − log π_ref) − (log πθ − log π_ref) is −k1 against it (the official
    code, RUCBM/G-OPD ``dp_actor.py``). Only sampled reward terms may use it (a spec check).

    λ = 0 returns ``ref`` and λ = 1 returns ``teacher`` themselves; 0 < λ < 1 interpolates
    geometrically and λ > 1 extrapolates past the teacher (ExOPD). For λ > 0 it equals
    ``tilt(ref, teacher − ref, 1/λ)`` on full supports: the KL-regularized optimum for the reward
    log(π_T/π_ref) scaled by λ.

    Zero mass: for every λ ∉ {0, 1}, supp(q) = supp(ref) ∩ supp(teacher). For 0 < λ < 1 this is
    the formula itself; outside [0, 1] a zero of the factor with the negative exponent would give
    0^{negative} = +∞, and the rule instead gives q = 0 there (a token either model rules out
    stays ruled out). Where the supports are disjoint q has no mass at all: that position is all
    −inf, with zero gradient.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(
            f"extrapolate: lam must be a finite number ≥ 0 (0: ref, 1: teacher, > 1: past the teacher), got {lam}"
        )
    if lam == 0.0:
        return ref
    if lam == 1.0:
        return teacher
    if not normalized:
        return torch.where((ref > _NEG_INF) & (teacher > _NEG_INF), (1.0 - lam) * ref + lam * teacher, _NEG_INF)
    supported = (ref > _NEG_INF) & (teacher > _NEG_INF)
    safe_ref = torch.where(supported, ref, 0.0)
    safe_teacher = torch.where(supported, teacher, 0.0)
    return _log_normalized(((1.0 - lam) * safe_ref + lam * safe_teacher).masked_fill(~supported, _NEG_INF))


def mix(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """log q = log((1−α)·eᵃ + α·eᵇ), α ∈ [0, 1]; α = 0 returns ``a``, α = 1 returns ``b``.

    supp(q) = supp(a) ∪ supp(b) for 0 < α < 1, so disjoint supports give a finite mixture.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mix: alpha must lie in [0, 1], got {alpha}")
    if alpha == 0.0:
        return a
    if alpha == 1.0:
        return b
    # Where a = b = 0 logaddexp's gradient would be exp(−inf − (−inf)) = NaN: evaluate at a = 0.
    both_zero = (a == _NEG_INF) & (b == _NEG_INF)
    mixture = torch.logaddexp(torch.where(both_zero, 0.0, a) + math.log1p(-alpha), b + math.log(alpha))
    return mixture.masked_fill(both_zero, _NEG_INF)


def filter(p: Tensor, min_p: float, relative: bool = False) -> Tensor:
    """p without its tokens of probability < min_p (< min_p·max p if ``relative``), renormalized.

    q_i = p_i·1[p_i ≥ τ]/Z with τ = min_p or min_p·max_j p_j, compared in log space; the most
    probable token (every one, on ties) is always kept, so q is a distribution even for min_p
    above max p. Lp-Reg uses the relative form with min_p = 0.02 on πold (its ``apply_min_p``);
    then KL(q‖p) = −log Z, the log of the mass kept.
    """
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"filter: min_p must lie in [0, 1), got {min_p}")
    log_threshold: float | Tensor = math.log(min_p) if min_p > 0.0 else _NEG_INF
    max_logprob = p.amax(dim=-1, keepdim=True)
    if relative:
        log_threshold = log_threshold + max_logprob
    kept = (p >= log_threshold) | (p == max_logprob)
    return _log_normalized(p.masked_fill(~kept, _NEG_INF))


def temperature(p: Tensor, T: float) -> Tensor:
    """log q = log_softmax(p/T), q ∝ p^{1/T}: T > 1 flattens, T < 1 sharpens; supp(q) = supp(p)."""
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"temperature: T must be a finite number > 0, got {T}")
    return _log_normalized(p / T)


def _power_on_support(p: Tensor, exponent: Tensor | float) -> Tensor:
    """log q ∝ exponent·log p on supp(p) (0 outside), exponent ≥ 0 broadcasting against p."""
    supported = p > _NEG_INF
    return _log_normalized((exponent * torch.where(supported, p, 0.0)).masked_fill(~supported, _NEG_INF))


def reward_power(p: Tensor, reward: Tensor | float, floor: float = 0.5) -> Tensor:
    """log q ∝ φ(r)·log p on supp(p), φ(r) = floor + (1 − floor)·clamp(r, 0, 1) ∈ [floor, 1].

    RAPO's reward-aware reweighting of the reference (arXiv 2510.03865; the tempered form
    π_ref^{φ(r)}/Z with φ increasing into [0, 1] as secondary sources give it, φ not stated):
    a passing completion keeps the reference (φ = 1), a failing one gets it flattened toward
    uniform (φ = floor; 0 gives uniform). ``reward`` is supplied by the objective: the
    completion's reward, shape (..., 1) (or a number).
    """
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"reward_power: floor must lie in [0, 1], got {floor}")
    exponent: Tensor | float
    if isinstance(reward, Tensor):
        reward = reward.to(p.dtype)
        exponent = floor + (1.0 - floor) * reward.clamp(0.0, 1.0)
    else:
        exponent = floor + (1.0 - floor) * min(max(float(reward), 0.0), 1.0)
    return _power_on_support(p, exponent)


def uniform(p: Tensor) -> Tensor:
    """log q = −log|supp(p)| on supp(p): the uniform distribution over p's support (the whole
    vocabulary for a softmax). D = reverse_kl to it is log|supp| − H(πθ): an entropy bonus."""
    return _power_on_support(p, 0.0)


def sampled_token(token: Tensor) -> Tensor:
    """log q = 0 at the position's token, −inf elsewhere: its one-hot. ``token`` (..., V) bool is
    supplied by the objective. KL(q‖πθ) = −log πθ(y_t), the cross-entropy of the demonstration."""
    return torch.zeros(
        token.shape, dtype=torch.float64 if token.dtype == torch.bool else token.dtype, device=token.device
    ).masked_fill(~token.bool(), _NEG_INF)
