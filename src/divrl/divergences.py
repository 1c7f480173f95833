"""Divergences between next-token distributions, as pure functions on log-probabilities.

Policy p = πθ(·|s), target q, both given as **normalized log-probabilities** with any leading
shape and the vocabulary on the last dim. Every exact divergence returns one value per position
(the leading shape) and computes in the dtype it is given. Zero-probability entries (−inf) give
exact answers: 0·log 0 = 0, finite where the math is finite, +inf (never NaN) where a divergence
is infinite, and no NaN gradient wherever the value is finite (the "double where": unsafe entries
are replaced before the arithmetic, not only after it).

The rule for infinite and invalid values (public and fuzzed in tests/reliability/test_fuzz.py):

- Disjoint supports: +inf where the divergence is infinite (KL, χ², α ∉ (0, 1) where one side
  has mass the other lacks), with zero gradient, so a caller that masks the position gets finite
  gradients; the trainer skips a step whose loss is not finite. The bounded ones (total
  variation, Hellinger, jsd with 0 < β < 1, α ∈ (0, 1), Sinkhorn) stay finite.
- Extreme log-ratios (log-probs down to −1e30 and beyond): the value is exact, or +inf where it
  exceeds the dtype's range (e.g. χ² with q underflowing to 0 below a p > 0); never 0·∞ = NaN.
- A row without mass (all −inf, as ``divrl.targets.extrapolate`` gives on disjoint supports) is
  evaluated by the same sums over the vocabulary: KL(p‖∅) = +inf, KL(∅‖p) = 0; Sinkhorn, which
  has no coupling there, +inf.
- NaN inputs (a NaN logit makes its whole row NaN) give NaN in their rows and nowhere else;
  checking them here would cost a device sync per call in the chunked training path, so
  ``divrl.objectives`` raises the ValueError instead, where it reads the loss anyway.

Conventions (design notes §2; public and tested):

============================  =========================================================
name (params)                 D(p, q)
============================  =========================================================
``reverse_kl``                KL(p‖q) = Σ p log(p/q)                (mode-seeking)
``forward_kl``                KL(q‖p) = Σ q log(q/p)                (mass-covering)
``jsd`` (beta)                β=0: KL(q‖p); β=1: KL(p‖q); else β·KL(q‖m) + (1−β)·KL(p‖m),
                              m = β·q + (1−β)·p   (GKD; equals TRL's generalized_jsd_loss)
``total_variation``           ½ Σ |p − q|                           f(t) = ½|t − 1|
``chi2``                      Pearson χ²(p‖q) = Σ (p − q)²/q        f(t) = (t − 1)²
``hellinger``                 squared Hellinger Σ (√p − √q)²        f(t) = (√t − 1)²
``alpha`` (alpha)             Amari Σ q f(p/q), f(t) = (t^α − α t − (1−α))/(α(α−1));
                              α→1: KL(p‖q), α→0: KL(q‖p)
``f_divergence`` (f, ...)     D_f(p‖q) = Σ q f(p/q) for a user generator f
``sinkhorn`` (cost, ...)      entropic optimal transport between p and q (not a sum over V)
``sinkhorn_topk`` (cost, k)   the same on the union of the top-k supports, renormalized
============================  =========================================================

In the f-form, reverse KL is f(t) = t log t and forward KL f(t) = −log t.

Every divergence except the Sinkhorn ones is a sum over the vocabulary of an elementwise term of
(log p_v, log q_v); ``pointwise(name, **params)`` returns that term, and
``get(name)(lp, lq, **params) == pointwise(name, **params)(lp, lq).sum(-1)``. Each divergence is
written once, as its term (``divrl.chunked`` streams the same terms over vocabulary chunks).

Sampled estimators of KL(p‖q) from the log-probs of a token y ~ p, with r = log q(y) − log p(y):
k1 = −r, k2 = ½r², k3 = eʳ − 1 − r, and ``straight_through(value)`` ("value of k1/k3, gradient of
k2"); ``get_estimator(name)`` looks them up.

Sources: divrl design notes §2 and methods notes C6; J. Schulman, "Approximating KL Divergence"
(2020) for k1–k3; R. Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes" (GKD, ICLR 2024) for ``jsd``; M. Cuturi, "Sinkhorn Distances: Lightspeed
Computation of Optimal Transport" (NeurIPS 2013) for ``sinkhorn``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Divergence = Callable[..., Tensor]
Term = Callable[[Tensor, Tensor], Tensor]
TokenCost = Callable[[Tensor, Tensor], Tensor]

_NEG_INF = -math.inf
_DIVERGENCES: dict[str, Divergence] = {}
_TERMS: dict[str, Divergence] = {}


def _summed_over_vocabulary(name: str) -> Callable[[Divergence], Divergence]:
    """Register an elementwise term under ``name``; the public function is its sum over the last dim."""

    def register(term: Divergence) -> Divergence:
        @functools.wraps(term)
        def divergence(policy_logprobs: Tensor, target_logprobs: Tensor, **params: Any) -> Tensor:
            return term(policy_logprobs, target_logprobs, **params).sum(-1)

        _TERMS[name] = term
        _DIVERGENCES[name] = divergence
        return divergence

    return register


def _exp_or_inf(log_value: Tensor) -> Tensor:
    """exp(x), and a constant +inf (zero gradient) where exp overflows the dtype: a caller that masks
    that +inf out gets a zero gradient there, not exp's ∞·0 = NaN."""
    overflow = log_value > math.log(torch.finfo(log_value.dtype).max)
    return log_value.masked_fill(overflow, 0.0).exp().masked_fill(overflow, math.inf)


def _times_expm1_power(log_a: Tensor, y: Tensor, power: int) -> Tensor:
    """a·expm1(y)^power for finite y, a = e^{log a}, with no underflow-times-overflow 0·∞ = NaN.

    Directly while expm1(y)^power ≤ √max of the dtype (where a underflows to 0 the true value is
    below tiny·√max, negligible); beyond, exactly in log space:
    exp(log a + power·(y + log(−expm1(−y)))), +inf (zero gradient) where that overflows.
    """
    large = y > math.log(torch.finfo(y.dtype).max) / (2 * power)
    direct = log_a.exp() * torch.expm1(y.masked_fill(large, 0.0)).pow(power)
    safe_y = y.masked_fill(~large, 1.0)
    log_value = log_a + power * (safe_y + torch.log(-torch.expm1(-safe_y)))
    return torch.where(large, _exp_or_inf(log_value.masked_fill(~large, _NEG_INF)), direct)


def _in_float32_for_half(term: Divergence) -> Divergence:
    """``term`` computed in float32 for float16/bfloat16 inputs, cast back: e^{|log p − log q|} and
    its gradient overflow half precision (float16 max 65504) before the term itself does."""

    @functools.wraps(term)
    def upcast(policy_logprobs: Tensor, target_logprobs: Tensor, **params: Any) -> Tensor:
        dtype = torch.promote_types(policy_logprobs.dtype, target_logprobs.dtype)
        if dtype not in (torch.float16, torch.bfloat16):
            return term(policy_logprobs, target_logprobs, **params)
        return term(policy_logprobs.float(), target_logprobs.float(), **params).to(dtype)

    return upcast


def _weighted_by_first(
    log_a: Tensor, log_b: Tensor, weighted: Callable[[Tensor, Tensor], Tensor], at_infinity: float
) -> Tensor:
    """a·fn(log a − log b), given as ``weighted(log a, d)`` = a·fn(d) on finite log-ratios d (fn finite
    at 0): exactly 0 where a = 0, a·fn(+∞) = a·``at_infinity`` where a > 0 = b.

    Non-finite log-ratios are replaced before ``weighted``, so no gradient is NaN; an infinite
    fn(+∞) gives +inf there with a zero gradient (a caller that masks it stays finite).
    """
    log_ratio = log_a - log_b  # +inf where a > 0 = b; −inf or NaN where a = 0
    b_only_zero = log_ratio == math.inf
    inner = weighted(log_a, torch.where((log_a == _NEG_INF) | b_only_zero, 0.0, log_ratio))  # NaN inputs stay NaN
    if math.isinf(at_infinity):
        return inner.masked_fill(b_only_zero, at_infinity)
    return torch.where(b_only_zero, log_a.exp() * at_infinity, inner)


def _times_log_ratio(log_a: Tensor, log_ratio: Tensor) -> Tensor:
    """a·log(a/b): the KL term."""
    return log_a.exp() * log_ratio


@_summed_over_vocabulary("reverse_kl")
def reverse_kl(policy_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v): mode-seeking; +inf where p_v > 0 = q_v."""
    return _weighted_by_first(policy_logprobs, target_logprobs, _times_log_ratio, math.inf)


@_summed_over_vocabulary("forward_kl")
def forward_kl(policy_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """KL(q‖p) = Σ_v q_v (log q_v − log p_v): mass-covering; +inf where q_v > 0 = p_v."""
    return _weighted_by_first(target_logprobs, policy_logprobs, _times_log_ratio, math.inf)


@_summed_over_vocabulary("jsd")
def jsd(policy_logprobs: Tensor, target_logprobs: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD of GKD (Agarwal et al. 2024), TRL's ``generalized_jsd_loss`` convention.

    β = 0: KL(q‖p); β = 1: KL(p‖q); 0 < β < 1: β·KL(q‖m) + (1−β)·KL(p‖m) with m = β·q + (1−β)·p.
    The mixture form tends to 0 at both ends, hence the separately defined endpoints. Always
    finite for 0 < β < 1; symmetric at β = ½ (the Jensen–Shannon divergence).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return _weighted_by_first(target_logprobs, policy_logprobs, _times_log_ratio, math.inf)
    if beta == 1.0:
        return _weighted_by_first(policy_logprobs, target_logprobs, _times_log_ratio, math.inf)
    # Where p = q = 0 the mixture is taken at p = 1 instead (its terms vanish anyway): keeps
    # logaddexp's gradient free of −inf − (−inf).
    both_zero = (policy_logprobs == _NEG_INF) & (target_logprobs == _NEG_INF)
    mixture_logprobs = torch.logaddexp(
        torch.where(both_zero, 0.0, policy_logprobs) + math.log1p(-beta), target_logprobs + math.log(beta)
    )
    return beta * _weighted_by_first(target_logprobs, mixture_logprobs, _times_log_ratio, math.inf) + (
        1.0 - beta
    ) * _weighted_by_first(policy_logprobs, mixture_logprobs, _times_log_ratio, math.inf)


@_summed_over_vocabulary("total_variation")
def total_variation(policy_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """Total variation ½ Σ_v |p_v − q_v| ∈ [0, 1]; symmetric."""
    return 0.5 * (policy_logprobs.exp() - target_logprobs.exp()).abs()


@_summed_over_vocabulary("chi2")
@_in_float32_for_half
def chi2(policy_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """Pearson χ²(p‖q) = Σ_v (p_v − q_v)²/q_v; +inf where p_v > 0 = q_v."""
    unbounded = (target_logprobs == _NEG_INF) & (policy_logprobs > _NEG_INF)
    # q·(p/q − 1)² = q·expm1(log p − log q)², and q (with p = 0) where log q − log p = +∞.
    term = _weighted_by_first(target_logprobs, policy_logprobs, lambda log_q, d: _times_expm1_power(log_q, -d, 2), 1.0)
    return term.masked_fill(unbounded, math.inf)


@_summed_over_vocabulary("hellinger")
def hellinger(policy_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """Squared Hellinger distance Σ_v (√p_v − √q_v)² ∈ [0, 2]; symmetric."""
    return ((0.5 * policy_logprobs).exp() - (0.5 * target_logprobs).exp()).square()


@_summed_over_vocabulary("alpha")
@_in_float32_for_half
def alpha(policy_logprobs: Tensor, target_logprobs: Tensor, alpha: float = 0.5) -> Tensor:
    """Amari α-divergence Σ_v q f(p/q), f(t) = (t^α − α t − (1−α))/(α(α−1)).

    α → 1 is KL(p‖q) and α → 0 is KL(q‖p), taken exactly at α ∈ {0, 1}; α = ½ is twice the
    squared Hellinger distance, α = 2 half of Pearson χ². Each term is ≥ 0 (and differs from the
    KL terms by q − p, which sums to 0). Computed as (p·expm1((α−1)·log(p/q))/(α−1) − p + q)/α for
    α ≥ ½, which is accurate near α = 1, and through D_α(p‖q) = D_{1−α}(q‖p) below ½.
    """
    if alpha < 0.5:
        policy_logprobs, target_logprobs, alpha = target_logprobs, policy_logprobs, 1.0 - alpha
    if alpha == 1.0:
        p_term = _weighted_by_first(policy_logprobs, target_logprobs, _times_log_ratio, math.inf)
    else:
        c = alpha - 1.0  # p·expm1(c·d)/c → p·(−1/c) as d → +∞ for c < 0, +∞ for c > 0
        p_term = _weighted_by_first(
            policy_logprobs,
            target_logprobs,
            lambda log_p, d: _times_expm1_power(log_p, c * d, 1) / c,
            math.inf if c > 0 else -1.0 / c,
        )
    return (p_term - policy_logprobs.exp() + target_logprobs.exp()) / alpha


@_summed_over_vocabulary("f_divergence")
def f_divergence(
    policy_logprobs: Tensor,
    target_logprobs: Tensor,
    f: Callable[[Tensor], Tensor],
    f_prime_inf: float = math.inf,
) -> Tensor:
    """D_f(p‖q) = Σ_v q_v f(p_v/q_v) for a convex generator f with f(1) = 0.

    ``f`` maps a tensor of ratios t ≥ 0 elementwise; it is also called at t = 0 for entries with
    p_v = 0 < q_v (term q·f(0)), so it must be defined there (write t log t as ``torch.xlogy(t, t)``).
    Entries with q_v = 0 < p_v contribute p_v·f'(∞), f'(∞) = lim_{t→∞} f(t)/t, given as
    ``f_prime_inf`` (default +inf, right for superlinear f such as t log t; ½ for total variation,
    1 for squared Hellinger, 0 for −log t). Entries with p_v = q_v = 0 contribute 0.

    It works on the probabilities e^{log p} in the given dtype: one that underflows to 0 counts as
    0, and where p/q overflows the term is its limit p·f'(∞) (+inf for superlinear f, where the
    exact value is finite but beyond the ratio's range: the closed forms compute such extreme
    log-ratios exactly).
    """
    policy_zero = policy_logprobs.exp() == 0
    target_zero = target_logprobs.exp() == 0
    log_ratio = torch.where(policy_zero | target_zero, 0.0, policy_logprobs - target_logprobs)
    target_zero = target_zero | (log_ratio > math.log(torch.finfo(log_ratio.dtype).max))
    both_positive = ~(policy_zero | target_zero)
    safe_target = torch.where(both_positive, target_logprobs, 0.0)
    safe_ratio = torch.where(both_positive, log_ratio, 0.0).exp()
    ratio_term = torch.where(both_positive, safe_target.exp() * f(safe_ratio), 0.0)
    # One-sided entries: q·f(0) where p = 0 < q, p·f'(∞) where q = 0 < p; an infinite
    # coefficient gives +inf with a zero gradient.
    edge_coefficient = torch.where(
        target_zero & ~policy_zero,
        f_prime_inf,
        torch.where(policy_zero & ~target_zero, f(torch.zeros_like(target_logprobs)), 0.0),
    )
    edge_mass = torch.where(policy_zero, target_logprobs, policy_logprobs).exp()
    infinite = edge_coefficient.isinf()
    edge_term = torch.where(infinite, edge_coefficient, edge_mass * edge_coefficient.masked_fill(infinite, 0.0))
    return ratio_term + edge_term


def embedding_cost(embeddings: Tensor) -> TokenCost:
    """Ground cost between tokens from their embeddings (V, H): cosine distance 1 − cos ∈ [0, 2].

    Returns a ``TokenCost``: given token ids of shapes (..., n) and (..., m), the (..., n, m)
    costs. Memory is that of the gathered embeddings, (..., n + m, H).
    """
    unit = torch.nn.functional.normalize(embeddings, dim=-1)

    def cost(ids_a: Tensor, ids_b: Tensor) -> Tensor:
        return 1.0 - unit[ids_a] @ unit[ids_b].transpose(-1, -2)

    return cost


def _cost_between(cost: Tensor | TokenCost, ids_a: Tensor, ids_b: Tensor) -> Tensor:
    if callable(cost):
        return cost(ids_a, ids_b)
    return cost.to(ids_a.device)[ids_a.unsqueeze(-1), ids_b.unsqueeze(-2)]


def _entropic_ot(
    policy_logprobs: Tensor, target_logprobs: Tensor, cost: Tensor, epsilon: float, iterations: int
) -> Tensor:
    """OT_ε(p, q) = min_{P1=p, Pᵀ1=q} ⟨P, C⟩ + ε·KL(P‖p⊗q), by log-domain Sinkhorn.

    The potentials f, g are iterated without autograd: f_i = −ε LSE_j(log q_j + (g_j − C_ij)/ε),
    g_j = −ε LSE_i(log p_i + (f_i − C_ij)/ε), with ε-scaling (ε starts at the largest finite C and
    halves every step down to its target, so small ε converges in far fewer steps); C_ij = +inf
    forbids moving i to j. The value is the dual ⟨p, f⟩ + ⟨q, g⟩, whose gradient in (p, q) is (f, g)
    at convergence (envelope theorem), so memory is one (..., V, V) buffer rather than one per
    iteration; the cost gets no gradient. A zero-mass token drops out of the plan: its potential is
    set to 0 (it is +inf where all its moves are forbidden), its gradient p_i·f_i is 0. A position
    where p or q has no mass at all (an all −inf row) has no coupling: +inf there (the infimum over
    an empty set), with zero gradient.
    """
    if epsilon <= 0.0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn: iterations must be >= 1, got {iterations}")
    no_mass = ((policy_logprobs == _NEG_INF).all(-1) | (target_logprobs == _NEG_INF).all(-1)).unsqueeze(-1)
    policy_logprobs, target_logprobs = (
        policy_logprobs.masked_fill(no_mass, 0.0),
        target_logprobs.masked_fill(no_mass, 0.0),
    )
    cost = cost.to(policy_logprobs.device, policy_logprobs.dtype)
    finite_cost = cost[cost.isfinite()]  # +inf forbids a move; ε-scaling starts from the finite costs
    cost_scale = finite_cost.max().item() if finite_cost.numel() else 0.0
    with torch.no_grad():
        log_p, log_q = policy_logprobs.detach(), target_logprobs.detach()
        g = torch.zeros_like(log_q)
        for step in range(iterations):
            eps = max(epsilon, cost_scale * 0.5**step)
            f = -eps * torch.logsumexp((log_q + g / eps).unsqueeze(-2) - cost / eps, dim=-1)
            f = f.masked_fill(log_p == _NEG_INF, 0.0)
            g = -eps * torch.logsumexp((log_p + f / eps).unsqueeze(-1) - cost / eps, dim=-2)
            g = g.masked_fill(log_q == _NEG_INF, 0.0)
    value = (policy_logprobs.exp() * f).sum(-1) + (target_logprobs.exp() * g).sum(-1)
    return value.masked_fill(no_mass.squeeze(-1), math.inf)


def sinkhorn(
    policy_logprobs: Tensor,
    target_logprobs: Tensor,
    cost: Tensor | TokenCost,
    epsilon: float = 0.1,
    iterations: int = 100,
) -> Tensor:
    """Entropic optimal transport between the next-token distributions (Cuturi 2013; SinKD).

    OT_ε(p, q) = min over couplings P of p and q of ⟨P, C⟩ + ε·KL(P‖p⊗q) ≥ 0, computed by
    ``iterations`` log-domain Sinkhorn steps. ``cost`` is the ground cost C between tokens: a
    (V, V) tensor, or a ``TokenCost`` callable (e.g. ``embedding_cost(E)``) that is called on
    ``arange(V)`` twice; C_ij = +inf forbids moving mass from token i to j. As ε → 0 it tends to
    the optimal transport cost W(p, q); with the 0/1 cost C = 1 − I, W is the total variation. ε is
    in the units of C; smaller ε needs more iterations. Unlike KL it stays finite, with finite
    gradients, on disjoint supports; it is not 0 at p = q for ε > 0 (entropic blur). Cost: O(V²)
    memory and O(iterations·V²) time per position, so use it for small vocabularies and
    ``sinkhorn_topk`` for real ones.
    """
    if not isinstance(cost, Tensor):
        ids = torch.arange(policy_logprobs.shape[-1], device=policy_logprobs.device)
        cost = cost(ids, ids)
    return _entropic_ot(policy_logprobs, target_logprobs, cost, epsilon, iterations)


def sinkhorn_topk(
    policy_logprobs: Tensor,
    target_logprobs: Tensor,
    cost: Tensor | TokenCost,
    k: int = 32,
    epsilon: float = 0.1,
    iterations: int = 100,
) -> Tensor:
    """``sinkhorn`` restricted to the union of the top-k tokens of p and of q, both renormalized.

    The support is the k most likely tokens of p followed by those of q not already among them
    (duplicates get zero mass), 2k slots per position; ``cost`` is indexed (tensor) or called
    (``TokenCost``, e.g. ``embedding_cost(model.get_input_embeddings().weight)``) on those ids.
    Memory O(k²) per position instead of O(V²): tractable at V = 49k.
    """
    if k < 1:
        raise ValueError(f"sinkhorn_topk: k must be >= 1, got {k}")
    k = min(k, policy_logprobs.shape[-1])
    policy_ids = policy_logprobs.topk(k, dim=-1).indices
    target_ids = target_logprobs.topk(k, dim=-1).indices
    duplicate = (target_ids.unsqueeze(-1) == policy_ids.unsqueeze(-2)).any(-1)
    support = torch.cat([policy_ids, target_ids], dim=-1)
    kept = torch.cat([torch.zeros_like(duplicate), duplicate], dim=-1)

    def restricted(logprobs: Tensor) -> Tensor:
        gathered = logprobs.gather(-1, support).masked_fill(kept, _NEG_INF)
        no_mass = (gathered == _NEG_INF).all(-1, keepdim=True)  # stays all −inf: +inf in _entropic_ot
        return gathered - gathered.masked_fill(no_mass, 0.0).logsumexp(-1, keepdim=True)

    return _entropic_ot(
        restricted(policy_logprobs),
        restricted(target_logprobs),
        _cost_between(cost, support, support),
        epsilon,
        iterations,
    )


_DIVERGENCES["sinkhorn"] = sinkhorn
_DIVERGENCES["sinkhorn_topk"] = sinkhorn_topk


def names() -> list[str]:
    """Every registered divergence name, sorted."""
    return sorted(_DIVERGENCES)


def is_pointwise(name: str) -> bool:
    """Whether divergence ``name`` is a sum over the vocabulary of an elementwise term."""
    return name in _TERMS


def get(name: str) -> Divergence:
    """The divergence function registered under ``name``; unknown names raise a ValueError."""
    if name not in _DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(sorted(_DIVERGENCES))}")
    return _DIVERGENCES[name]


def pointwise(name: str, **params: Any) -> Term:
    """The elementwise term of divergence ``name``: ``get(name)(lp, lq, **params)`` is its sum over dim −1.

    The term has the shape of its inputs, is differentiable and −inf-safe like the divergence.
    """
    if name not in _TERMS:
        if name in _DIVERGENCES:
            raise ValueError(f"{name!r} is not a sum of elementwise terms over the vocabulary")
        raise ValueError(f"unknown divergence {name!r}; pointwise ones: {', '.join(sorted(_TERMS))}")
    term = _TERMS[name]
    try:
        inspect.signature(term).bind(None, None, **params)
    except TypeError as error:
        raise ValueError(f"{name}: {error}") from None
    return functools.partial(term, **params)


# ---------------------------------------------------------------------------------------------
# Sampled estimators of KL(p‖q) at a token y ~ p (Schulman 2020; methods notes C6).


def _log_ratio(policy_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """r = log q(y) − log p(y), with r = 0 where both are −inf."""
    both_zero = (policy_logprobs == _NEG_INF) & (target_logprobs == _NEG_INF)
    return (target_logprobs - policy_logprobs).masked_fill(both_zero, 0.0)


def k1(policy_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """k1 = −r = log p(y) − log q(y).

    Value: unbiased, E_p[k1] = KL(p‖q), but can be negative per sample (high variance).
    As a loss on on-policy samples: ∇k1 = ∇log p(y), zero in expectation (no KL gradient). Used as
    a reward (score-function gradient) it gives ∇KL(p‖q).
    """
    return -_log_ratio(policy_logprobs, target_logprobs)


def k2(policy_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """k2 = ½r².

    Value: biased, E_p[k2] = ½E_p[log²(p/q)] ≈ KL(p‖q) only to second order; ≥ 0.
    As a loss on on-policy samples: E_p[∇k2] = E_p[(log p − log q)∇log p] = ∇KL(p‖q), the
    reverse-KL gradient.
    """
    r = _log_ratio(policy_logprobs, target_logprobs)
    unbounded = r.isinf()
    return (0.5 * r.masked_fill(unbounded, 0.0).square()).masked_fill(unbounded, math.inf)


def k3(policy_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """k3 = eʳ − 1 − r.

    Value: unbiased, E_p[k3] = KL(p‖q), and ≥ 0 per sample (low variance).
    As a loss on on-policy samples: E_p[∇k3] = E_p[(1 − q/p)∇log p] = −Σ q∇log p = ∇KL(q‖p), the
    *forward*-KL gradient, not the reverse one its value estimates.
    """
    r = _log_ratio(policy_logprobs, target_logprobs)
    unbounded = r > math.log(torch.finfo(r.dtype).max)  # eʳ overflows; includes p(y) = 0 < q(y)
    safe_r = r.masked_fill(unbounded, 0.0)
    return (torch.expm1(safe_r) - safe_r).masked_fill(unbounded, math.inf)


def straight_through(value_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """Estimator with the value of ``value_fn`` and the gradient of k2: v.detach() + k2 − k2.detach().

    With v = k1 or k3 the value is unbiased for KL(p‖q) and, as a loss on on-policy samples, the
    expected gradient is ∇KL(p‖q).
    """

    def estimator(policy_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
        gradient_carrier = k2(policy_logprobs, target_logprobs)
        value = value_fn(policy_logprobs, target_logprobs)
        gradient_only = torch.where(gradient_carrier.isfinite(), gradient_carrier - gradient_carrier.detach(), 0.0)
        return value.detach() + gradient_only

    estimator.__name__ = f"{value_fn.__name__}_st"
    estimator.__doc__ = f"Value of {value_fn.__name__}, gradient of k2 (see ``straight_through``)."
    return estimator


k1_st = straight_through(k1)
k3_st = straight_through(k3)

_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": k1,
    "k2": k2,
    "k3": k3,
    "k1_st": k1_st,
    "k3_st": k3_st,
}


def get_estimator(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The sampled KL(p‖q) estimator registered under ``name``; unknown names raise a ValueError."""
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid: {', '.join(_ESTIMATORS)}")
    return _ESTIMATORS[name]
