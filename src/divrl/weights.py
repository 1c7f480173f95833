"""Token masks and weights: small pure functions of per-token statistics, registered by name.

A weight is a function ``fn(stats: TokenStats, **params) -> Tensor`` of shape (N,), one value per
flat completion token (design notes §4), registered once with ``@register_weight(name)`` and then
usable on any loss term: ``compute([(name, params), ...], stats)`` is the product of the named
functions' outputs. Parameters are plain numbers whose type and range are declared in the
signature (``Annotated[float, Interval(...)]``), so ``check(name, params)`` validates a config
before any model or tensor exists.

=========================================  ======================================================
name (params)                              w_t
=========================================  ======================================================
``entropy_quantile`` (top=0.2)             1 if H_t is among the ⌈top·N⌉ highest entropies of
                                           the batch, else 0 (Wang et al. 2025, forking tokens)
``asymmetric`` (positive=1, negative=1)    ``positive`` if A > 0, ``negative`` if A < 0, 1 if A = 0
                                           (NSR / W-REINFORCE, Zhu et al. 2025)
``pass_rate`` (a=1, b=1)                   p̂^a·(1 − p̂)^b of the token's group (PACED)
``accuracy_tanh``                          (tanh(ā) + 1)/2, ā the batch's pass rate: FG-ExPO's
                                           accuracy-conditioned KL scale
``dads``                                   on positive-advantage completions 1 − exp(−e·p̂) for
                                           0 < p̂ < 1, else 1 (APO's difficulty-adaptive KL)
``stcr``                                   on failed completions longer than their group's mean
                                           passing length ℓ̄⁺: 2 − 1.00001^{−(ℓ − ℓ̄⁺)}, else 1 (APO)
``low_probability_negatives`` (fraction)   1 on the lowest-probability ``fraction`` of the
                                           negative-advantage tokens that the term's target keeps
                                           (Lp-Reg, Huang et al. 2025)
``reference_entropy_above`` (threshold)    1 where the reference's entropy H_ref(s_t) > threshold
                                           nats, else 0 (ReasonMaxxer's gate)
``reference_entropy_at_most`` (threshold)  its complement: 1 where H_ref(s_t) ≤ threshold
``diversity_allocation`` (tau)            on passing completions |group|·softmax over the group's
                                           passing ones of τ·d̄ (DSDR's global-to-local weight), else 0
``failed``                                 1 on completions that did not pass, else 0 (KDRL's
                                           response-level reward-guided KD mask)
``group_unsolved``                         1 on completions of groups where none passed (KDRL's
                                           group-level mask)
``reference_kl_quantile`` (top,           1 on the ⌈top·N⌉ tokens with the largest exact KL(πθ‖π_ref)
complement)                                (the reverse with complement; EKSFT's S_KL)
``confidence_shift`` (alpha,               on failed completions 1 + α·softplus(c_i), c_i the mean
length_normalized)                         (or sum) over the completion of log πold − log π_ref;
                                           else 1 (ACE's negative-advantage scale)
``resrl`` (rank, min_weight, positive,     ``positive`` (λ) on passing completions; on failed ones
quantile_low, quantile_high,               min_weight + (1 − min_weight)·clip((d_t − lo)/(hi − lo),
max_positive_tokens)                       0, 1), d_t the residual of LN(h_t) off the group's
                                           positive PCA subspace (ResRL, Lin et al. 2026)
``success_adaptive`` (base=0.5, coef=1.5)  on negative-advantage completions clamp(base +
                                           coef·r̄_g, 0, 1), r̄_g the group's mean reward; else 1
                                           (GUI-Libra's success-adaptive negative scaling)
=========================================  ======================================================
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

WeightFn = Callable[..., Tensor]


@dataclass
class TokenStats:
    """Statistics of N flat completion tokens (design.md §4), all detached."""

    rows: Tensor  # (N,) long: the completion each token belongs to
    advantages: Tensor  # (B,) per completion
    rewards: Tensor  # (B,) per completion
    group_pass_rate: Tensor  # (B,) fraction of the completion's group's samples with full score
    entropy: Tensor | None = None  # (N,) policy entropy at the token's position
    logprobs: Tensor | None = None  # (N,) policy log-prob of the sampled token
    old_logprobs: Tensor | None = None  # (N,) behaviour policy
    ref_logprobs: Tensor | None = None  # (N,) reference model
    target_logprobs: Tensor | None = None  # (N,) the weighted term's target q at the sampled token
    batch_pass_rate: float | None = None  # ā: fraction of the whole batch's completions that passed
    passed: Tensor | None = None  # (B,) bool: the completion got the full task score
    groups: Tensor | None = None  # (B,) long: the prompt (group) each completion answers
    reference_entropy: Tensor | None = None  # (N,) reference model's entropy at the token's position
    reference_kl: Tensor | None = None  # (N,) exact KL(πθ‖π_ref) at the token's position
    diversity: Tensor | None = None  # (B,) DSDR's clipped global diversity d̄ of each completion
    hidden: Tensor | None = None  # (N, H) the policy's hidden states that feed its head (ResRL)


@dataclass(frozen=True)
class Interval:
    """The finite numbers x with low ≤ x ≤ high (low < x if ``open_low``): a parameter's range."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)):
            return False  # a set of numbers
        above = self.low < value if self.open_low else self.low <= value
        return math.isfinite(value) and above and value <= self.high

    def __str__(self) -> str:
        high = f"{self.high:g}]" if math.isfinite(self.high) else "∞)"
        return f"{'(' if self.open_low else '['}{self.low:g}, {high}"


NonNegative = Annotated[float, Interval(0.0)]
Nats = Annotated[float, Interval(0.0)]
Fraction = Annotated[float, Interval(0.0, 1.0, open_low=True)]


@dataclass(frozen=True)
class _Registered:
    fn: WeightFn
    types: dict[str, type]  # parameter → type, in signature order
    ranges: dict[str, Interval]
    required: list[str]  # parameters without a default


_WEIGHTS: dict[str, _Registered] = {}


def register_weight(name: str) -> Callable[[WeightFn], WeightFn]:
    """Register ``fn(stats, **params) -> (N,) Tensor`` under ``name``.

    Each parameter after ``stats`` is annotated with its type, optionally
    ``Annotated[type, Interval(...)]`` for its range; ``check`` enforces both.
    """

    def register(fn: WeightFn) -> WeightFn:
        if name in _WEIGHTS:
            raise ValueError(f"weight {name!r} is already registered")
        params = list(inspect.signature(fn).parameters.values())[1:]
        hints = typing.get_type_hints(fn, include_extras=True)
        types: dict[str, type] = {}
        ranges: dict[str, Interval] = {}
        for param in params:
            hint = hints[param.name]
            if typing.get_origin(hint) is Annotated:
                hint, *metadata = typing.get_args(hint)
                ranges.update((param.name, m) for m in metadata if isinstance(m, Interval))
            types[param.name] = hint
        required = [param.name for param in params if param.default is inspect.Parameter.empty]
        _WEIGHTS[name] = _Registered(fn, types, ranges, required)
        return fn

    return register


def names() -> list[str]:
    """The registered weight names, sorted."""
    return sorted(_WEIGHTS)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check(name: str, params: Mapping[str, object]) -> None:
    """Raise ValueError unless ``name`` is registered and ``params`` are its parameters, typed and in range.

    Needs no tensors: config validation calls it before any model loads.
    """
    if name not in _WEIGHTS:
        suggestion = _did_you_mean(str(name), names())
        raise ValueError(f"unknown weight {name!r}{suggestion}; valid: {', '.join(names())}")
    registered = _WEIGHTS[name]
    for param, value in params.items():
        if param not in registered.types:
            valid = list(registered.types)
            raise ValueError(
                f"weight {name!r} has no parameter {param!r}{_did_you_mean(param, valid)}; "
                f"parameters: {', '.join(valid) or 'none'}"
            )
        expected = registered.types[param]
        numeric = expected is float and isinstance(value, int)
        if (isinstance(value, bool) and expected is not bool) or not (isinstance(value, expected) or numeric):
            raise ValueError(f"weight {name!r}: {param} must be of type {expected.__name__}, got {value!r}")
        allowed = registered.ranges.get(param)
        if allowed is not None and value not in allowed:
            raise ValueError(f"weight {name!r}: {param} must lie in {allowed}, got {value!r}")
    missing = [param for param in registered.required if param not in params]
    if missing:
        raise ValueError(f"weight {name!r} needs the parameters {', '.join(missing)}")


def compute(specs: Sequence[tuple[str, Mapping[str, object]]], stats: TokenStats) -> Tensor:
    """The product over ``specs`` = [(name, params), ...] of the named weights, shape (N,).

    An empty list gives ones; each spec is checked first.
    """
    weight = torch.ones(stats.rows.shape, dtype=stats.advantages.dtype, device=stats.rows.device)
    for name, params in specs:
        check(name, params)
        weight = weight * _WEIGHTS[name].fn(stats, **params)
    return weight


def _required(stats: TokenStats, statistic: str, weight: str) -> Tensor:
    value = getattr(stats, statistic)
    if value is None:
        raise ValueError(f"weight {weight!r} needs the statistic {statistic!r}, which is None")
    return value


@register_weight("entropy_quantile")
def entropy_quantile(stats: TokenStats, top: Fraction = 0.2, complement: bool = False) -> Tensor:
    """Mask of the high-entropy minority ("forking") tokens: 1 where H_t ≥ τ, else 0 (the reverse
    with ``complement``).

    τ is the ⌈top·N⌉-th largest entropy among the N tokens given (a micro-batch, in the trainer), i.e.
    the (1 − top) quantile over them (not per completion), so ⌈top·N⌉ tokens are kept, more on ties.
    Wang et al., "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RLVR"
    (NeurIPS 2025; their ``get_global_entropy_top_mask``), top = 0.2.
    """
    return _top_fraction(_required(stats, "entropy", "entropy_quantile"), top, complement)


def _top_fraction(values: Tensor, top: float, complement: bool) -> Tensor:
    """1 on the ⌈top·N⌉ largest values (more on ties), 0 elsewhere; swapped with `complement`."""
    count = values.numel()
    if count == 0:
        return torch.zeros_like(values)
    kept = max(1, math.ceil(top * count - 1e-9 * count))  # 1e-9: 0.3·10 is 3, not 3.0000000000000004
    mask = values >= values.topk(kept).values[-1]
    return (~mask if complement else mask).to(values.dtype)


@register_weight("asymmetric")
def asymmetric(stats: TokenStats, positive: NonNegative = 1.0, negative: NonNegative = 1.0) -> Tensor:
    """w_t = ``positive`` if A > 0, ``negative`` if A < 0, 1 if A = 0, A the completion's advantage.

    Reweights positive and negative sample reinforcement (NSR / W-REINFORCE, Zhu et al. 2025,
    "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning": positive = 0.1;
    methods notes entry 14).
    """
    advantage = stats.advantages[stats.rows]
    weight = torch.ones_like(advantage)
    return weight.masked_fill(advantage > 0, positive).masked_fill(advantage < 0, negative)


@register_weight("pass_rate")
def pass_rate(stats: TokenStats, a: NonNegative = 1.0, b: NonNegative = 1.0) -> Tensor:
    """w_t = p̂^a·(1 − p̂)^b, p̂ the pass rate of the token's group, with 0⁰ = 1.

    PACED (arXiv 2603.11178, methods notes entry 13): a Beta kernel that vanishes on all-correct
    and all-wrong groups (a, b > 0) and peaks at p̂ = a/(a + b); default a = b = 1, w = p̂(1 − p̂).
    """
    rate = stats.group_pass_rate[stats.rows]
    return rate.pow(a) * (1.0 - rate).pow(b)


@register_weight("low_probability_negatives")
def low_probability_negatives(stats: TokenStats, fraction: Fraction = 0.01) -> Tensor:
    """Lp-Reg's token set: 1 on negative-advantage tokens whose policy log-prob is among the lowest
    ``fraction`` of all negative-advantage tokens of the batch (⌈fraction·N⁻⌉ of them, more on ties)
    and that the term's target keeps, log πθ(y_t) < log q(y_t) (false where the filtered proxy
    removed the token); else 0.

    Read in the official code (CarlanLark/Lp-Reg-dev, ``compute_policy_loss_lp_reg``; methods notes
    entry Lp-Reg): fraction = 1% (Qwen3-14B) or 0.5% (Qwen2.5-32B); positive tokens are never
    regularized.
    """
    logprobs = _required(stats, "logprobs", "low_probability_negatives")
    target = _required(stats, "target_logprobs", "low_probability_negatives")
    negative = stats.advantages[stats.rows] < 0
    mask = torch.zeros_like(logprobs)
    count = int(negative.sum())
    if count == 0:
        return mask
    kept = max(1, math.ceil(fraction * count - 1e-9 * count))
    threshold = logprobs[negative].topk(kept, largest=False).values[-1]
    return mask.masked_fill(negative & (logprobs <= threshold) & (logprobs < target), 1.0)


@register_weight("accuracy_tanh")
def accuracy_tanh(stats: TokenStats) -> Tensor:
    """FG-ExPO's accuracy-conditioned KL scale β_eff/β = (tanh(ā) + 1)/2 (arXiv 2605.11403 §3.2),
    ā the mean binary verifier score over the whole batch: ∈ [0.5, 0.881], looser when the batch
    fails more. The same value for every token (a coefficient, logged as the term's mean weight)."""
    if stats.batch_pass_rate is None:
        raise ValueError("weight 'accuracy_tanh' needs the statistic 'batch_pass_rate', which is None")
    value = (math.tanh(stats.batch_pass_rate) + 1.0) / 2.0
    return torch.full(stats.rows.shape, value, dtype=stats.advantages.dtype, device=stats.rows.device)


@register_weight("dads")
def dads(stats: TokenStats) -> Tensor:
    """APO's difficulty-adaptive divergence shaping (View-R1 code, ``calculate_kl_weight``): on
    completions with a positive advantage, w = 1 − exp(−e·p̂) (p̂ the group pass rate, difficulty
    1 − p̂), so hard prompts get a looser KL on their correct answers; w = 1 where p̂ ∈ {0, 1} (the
    code's special case) and on every other completion. Meant for a KL term's weight."""
    rate = stats.group_pass_rate[stats.rows]
    positive = stats.advantages[stats.rows] > 0
    interior = (rate > 0) & (rate < 1)
    return torch.where(positive & interior, 1.0 - torch.exp(-math.e * rate), 1.0).to(stats.advantages.dtype)


@register_weight("stcr")
def stcr(stats: TokenStats) -> Tensor:
    """APO's suboptimal-trajectory complexity regularization (View-R1 code, experience_maker.py): a
    failed completion of length ℓ longer than ℓ̄⁺, the mean length of its group's passing
    completions, has its advantage scaled by 2 − 1.00001^{−(ℓ − ℓ̄⁺)} ∈ [1, 2); every other
    completion, and every completion of a group with no pass, keeps 1. Meant for pg_weight."""
    passed = _required(stats, "passed", "stcr")
    groups = _required(stats, "groups", "stcr")
    n = len(stats.advantages)
    ones = torch.ones(len(stats.rows), dtype=torch.float64, device=stats.rows.device)
    length = torch.zeros(n, dtype=torch.float64, device=stats.rows.device).index_add_(0, stats.rows, ones)
    _, group_index = torch.unique(groups, return_inverse=True)
    n_groups = int(group_index.max()) + 1 if n else 0
    pass_len = torch.zeros(n_groups, dtype=torch.float64, device=stats.rows.device).index_add_(
        0, group_index, length * passed
    )
    pass_count = torch.zeros(n_groups, dtype=torch.float64, device=stats.rows.device).index_add_(
        0, group_index, passed.double()
    )
    excess = length - pass_len[group_index] / pass_count[group_index].clamp(min=1)
    applies = ~passed & (excess > 0) & (pass_count[group_index] > 0)
    per_completion = torch.where(applies, 2.0 - 1.00001 ** (-excess), 1.0)
    return per_completion[stats.rows].to(stats.advantages.dtype)


# Weights that read the reference model (`TokenStats.reference_entropy`, `ref_logprobs`): an
# objective using one needs the reference.
READ_REFERENCE = frozenset(
    {"reference_entropy_above", "reference_entropy_at_most", "confidence_shift", "reference_kl_quantile"}
)
# Weights that read the weighted term's target at the sampled token (`TokenStats.target_logprobs`):
# only a term with a sampled estimator has it.
READ_TARGET = frozenset({"low_probability_negatives"})
# Weights that read statistics of the online batch (`groups`, `batch_pass_rate`, `diversity`),
# which a batch of stored responses lacks.
READ_BATCH = frozenset({"accuracy_tanh", "stcr", "diversity_allocation", "success_adaptive", "resrl"})


@register_weight("reference_entropy_above")
def reference_entropy_above(stats: TokenStats, threshold: Nats = 1.4) -> Tensor:
    """ReasonMaxxer's gate (arXiv 2605.06241, authors' code; methods notes): 1 at the positions
    where the reference (base) model's teacher-forced entropy exceeds an absolute ``threshold`` in
    nats (1.4 in the authors' example recipe; swept 1.0–2.2), else 0. Absolute, not a quantile."""
    entropy = _required(stats, "reference_entropy", "reference_entropy_above")
    return (entropy > threshold).to(stats.advantages.dtype)


@register_weight("reference_entropy_at_most")
def reference_entropy_at_most(stats: TokenStats, threshold: Nats = 1.4) -> Tensor:
    """The complement of ``reference_entropy_above``: 1 where H_ref(s_t) ≤ ``threshold``."""
    return 1.0 - reference_entropy_above(stats, threshold)


@register_weight("confidence_shift")
def confidence_shift(stats: TokenStats, alpha: NonNegative = 1.0, length_normalized: bool = True) -> Tensor:
    """ACE's asymmetric confidence penalty (arXiv 2602.21420): on completions with a negative
    advantage w_i = 1 + α·softplus(c_i), elsewhere 1, with the confidence shift
    c_i = log πθ(y_i|x) − log π_ref(y_i|x) (the abstract's form) taken at the behaviour policy
    that sampled the batch (detached: the multiplier is a stop-gradient scale of the advantage),
    averaged over the completion's tokens when ``length_normalized`` (as the implementation is
    reported to do; the sum otherwise). Meant for pg_weight: it scales A_i < 0 by w_i, so
    overconfident errors (c_i > 0: reinforced beyond the reference) are pushed down harder;
    c_i = 0 still scales by 1 + α·log 2. α is not given in the sources read; default 1.
    """
    old = _required(stats, "old_logprobs", "confidence_shift")
    ref = _required(stats, "ref_logprobs", "confidence_shift")
    n = len(stats.advantages)
    shift = torch.zeros(n, dtype=torch.float64, device=stats.rows.device).index_add_(
        0, stats.rows, (old - ref).double()
    )
    if length_normalized:
        ones = torch.ones(len(stats.rows), dtype=torch.float64, device=stats.rows.device)
        count = torch.zeros(n, dtype=torch.float64, device=stats.rows.device).index_add_(0, stats.rows, ones)
        shift = shift / count.clamp(min=1)
    scale = torch.where(stats.advantages < 0, 1.0 + alpha * torch.nn.functional.softplus(shift), 1.0)
    return scale[stats.rows].to(stats.advantages.dtype)


@register_weight("diversity_allocation")
def diversity_allocation(stats: TokenStats, tau: NonNegative = 5.0) -> Tensor:
    """DSDR's global-to-local allocation (arXiv 2602.19895, Eq. 11): over the passing completions P
    of a group, w_i = exp(τ·d̄_i)/Σ_{j∈P} exp(τ·d̄_j) with d̄ the clipped global diversity
    (`divrl.diversity`); 0 on failing completions and on groups without a pass. Multiplied by the
    group's size, so that with seq_mean_token_mean aggregation (1/(B·T_i), DSDR's) a term weighted
    by it is the paper's mean over prompts of Σ_i w_i·(1/T_i)·Σ_t. τ = 5 (paper default; τ → 0:
    uniform over the passing completions)."""
    diversity = _required(stats, "diversity", "diversity_allocation")
    passed = _required(stats, "passed", "diversity_allocation")
    groups = _required(stats, "groups", "diversity_allocation")
    _, group = torch.unique(groups, return_inverse=True)
    n_groups = int(group.max()) + 1 if len(group) else 0
    logits = torch.where(passed, tau * diversity.double(), -math.inf)
    top = torch.full((n_groups,), -math.inf, dtype=torch.float64, device=stats.rows.device).scatter_reduce(
        0, group, logits, "amax"
    )
    top = torch.where(torch.isfinite(top), top, 0.0)
    mass = torch.where(passed, torch.exp(logits - top[group]), 0.0)
    total = torch.zeros(n_groups, dtype=torch.float64, device=stats.rows.device).index_add_(0, group, mass)
    size = torch.zeros(n_groups, dtype=torch.float64, device=stats.rows.device).index_add_(
        0, group, torch.ones_like(mass)
    )
    weight = torch.where(passed, mass / total[group].clamp(min=1e-300) * size[group], 0.0)
    return weight[stats.rows].to(stats.advantages.dtype)


@register_weight("failed")
def failed(stats: TokenStats) -> Tensor:
    """1 on the tokens of completions that did not pass, else 0: KDRL's response-level
    reward-guided KD mask (arXiv 2506.02208 §3.4: distil only where the student's answer is wrong)."""
    passed = _required(stats, "passed", "failed")
    return (~passed[stats.rows]).to(stats.advantages.dtype)


@register_weight("group_unsolved")
def group_unsolved(stats: TokenStats) -> Tensor:
    """1 on the tokens of completions whose whole group failed (pass rate 0), else 0: KDRL's
    group-level mask (distil only where GRPO has no signal)."""
    return (stats.group_pass_rate[stats.rows] == 0).to(stats.advantages.dtype)


@register_weight("reference_kl_quantile")
def reference_kl_quantile(stats: TokenStats, top: Fraction = 0.2, complement: bool = False) -> Tensor:
    """EKSFT's S_KL (arXiv, "Entropy-KL Divergence-based Token Masking for Selective Fine-tuning";
    code MINE-USTC/EKSFT ``train/eksft/trainer.py``): 1 on the ⌈top·N⌉ tokens whose position has
    the largest exact KL(πθ‖π_ref) over the vocabulary, else 0 (the reverse with ``complement``).
    ρ = top = 0.2 in the authors' script. Exactly ⌈top·N⌉ tokens (ties broken by position, not all
    kept: at the first step πθ = π_ref and every KL is 0)."""
    kl = _required(stats, "reference_kl", "reference_kl_quantile")
    mask = torch.zeros(kl.shape, dtype=torch.bool, device=kl.device)
    if kl.numel():
        mask[kl.topk(max(1, math.ceil(top * kl.numel() - 1e-9 * kl.numel()))).indices] = True
    return (~mask if complement else mask).to(kl.dtype)


@register_weight("success_adaptive")
def success_adaptive(
    stats: TokenStats, base: Annotated[float, Interval()] = 0.5, coef: Annotated[float, Interval()] = 1.5
) -> Tensor:
    """GUI-Libra's success-adaptive negative scaling (arXiv 2602.22190; EasyR1 ``core_algos.py``,
    estimator ``grpo_weighted_positive_negative``, ``weighted_posneg_base``/``_coef``): on
    completions with a negative advantage w_i = clamp(base + coef·r̄_g, 0, 1), r̄_g the mean reward
    of the completion's group (the pass rate p̂ for a 0/1 verifier); 1 on the others. Defaults
    base λ0 = 0.5, coef κ = 1.5: negatives of groups with r̄_g ≥ 1/3 keep their full weight (plain
    GRPO there), those of a group with one pass in eight get 0.6875. Meant for pg_weight. The
    mean is over the completions given (a micro-batch holds whole groups in the trainer)."""
    groups = _required(stats, "groups", "success_adaptive")
    rewards = stats.rewards.double()
    _, group = torch.unique(groups, return_inverse=True)
    n_groups = int(group.max()) + 1 if len(group) else 0
    total = torch.zeros(n_groups, dtype=torch.float64, device=rewards.device).index_add_(0, group, rewards)
    count = torch.zeros(n_groups, dtype=torch.float64, device=rewards.device).index_add_(
        0, group, torch.ones_like(rewards)
    )
    scale = (base + coef * total / count.clamp(min=1)).clamp(0.0, 1.0)
    per_completion = torch.where(stats.advantages < 0, scale[group], 1.0)
    return per_completion[stats.rows].to(stats.advantages.dtype)


Probability = Annotated[float, Interval(0.0, 1.0)]


@register_weight("resrl")
def resrl(
    stats: TokenStats,
    rank: Annotated[int, Interval(1)] = 64,
    min_weight: Probability = 0.1,
    positive: NonNegative = 0.1,
    quantile_low: Probability = 0.2,
    quantile_high: Probability = 0.8,
    max_positive_tokens: Annotated[int, Interval(4)] = 4096,
) -> Tensor:
    """ResRL's token weight (Lin et al. 2026, "ResRL: Boosting LLM Reasoning via Negative Sample
    Projection Residual Reinforcement Learning", ICML; code 1229095296/ResRL, ``dp_actor.py``
    ``_compute_svd_token_weights``), meant for pg_weight (it scales A_i per token).

    Passing completions get ``positive`` (λ). In each group with both passing and failing
    completions: X = LN(h) of the passing completions' tokens (LN without affine, eps 1e-5; at most
    ``max_positive_tokens`` drawn uniformly without replacement), μ its mean, V_k the top
    k = min(rank, M − 1, r) right singular vectors of X − μ, r its numerical rank (σ > σ₁·max(M, H)·ε,
    as ``torch.linalg.matrix_rank``); a failing token gets
    d_t = ‖(I − V_kV_kᵀ)(LN(h_t) − μ)‖²/H and, with lo, hi the ``quantile_low``/``quantile_high``
    quantiles (linear interpolation) of d over the group's failing tokens,
    w_t = min_weight + (1 − min_weight)·clip((d_t − lo)/(hi − lo), 0, 1), or (min_weight + 1)/2 on
    all of them when hi − lo < 1e-5. Failing tokens keep 1 in groups without a pass, or with fewer
    than 4 passing tokens (the code's skips). Deviations from the code: PCA is an exact SVD (the
    code's ``torch.pca_lowrank`` is randomized, 4 power iterations) and k stops at the numerical rank:
    passing tokens repeat (a group's first tokens share the prompt's last state), and singular vectors
    past the rank are arbitrary directions that differ between LAPACK and cuSOLVER (measured: a 4%
    different loss on an H200); the cap's draw is seeded by M
    (no global RNG); "passing" is the task verdict (the code: sequence score > 0); h are the hidden
    states that feed the head (after the final norm; the code reads the penultimate layer).
    """
    hidden = _required(stats, "hidden", "resrl")
    passed = _required(stats, "passed", "resrl")
    groups = _required(stats, "groups", "resrl")
    dtype = stats.advantages.dtype
    token_passed, token_group = passed[stats.rows], groups[stats.rows]
    weight = torch.ones(stats.rows.shape, dtype=dtype, device=stats.rows.device).masked_fill(token_passed, positive)
    work = torch.promote_types(hidden.dtype, torch.float32)
    width = hidden.shape[-1]
    with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
        for group in torch.unique(groups[passed]).tolist():
            in_group = token_group == group
            pos, neg = in_group & token_passed, in_group & ~token_passed
            count = int(pos.sum())
            if count < 4 or not neg.any():
                continue
            x = hidden[pos].to(work)
            if count > max_positive_tokens:
                draw = torch.Generator().manual_seed(count)  # on the CPU: the same tokens on any device
                x = x[torch.randperm(count, generator=draw)[:max_positive_tokens].to(hidden.device)]
            x = torch.nn.functional.layer_norm(x, (width,))
            if not x.isfinite().all():  # no SVD of inf/NaN (it raises): the loss is non-finite anyway
                continue
            mu = x.mean(0)
            _, sigma, vh = torch.linalg.svd(x - mu, full_matrices=False)
            numerical_rank = int((sigma > sigma[0] * max(x.shape) * torch.finfo(work).eps).sum())
            basis = vh[: min(rank, x.shape[0] - 1, numerical_rank)].T  # (H, k)
            centred = torch.nn.functional.layer_norm(hidden[neg].to(work), (width,)) - mu
            residual = centred - (centred @ basis) @ basis.T
            distance = residual.pow(2).sum(-1) / width
            lo, hi = torch.quantile(distance, quantile_low), torch.quantile(distance, quantile_high)
            spread = (hi - lo).clamp(min=1e-6)
            if spread < 1e-5:
                scaled = torch.full_like(distance, (min_weight + 1.0) / 2.0)
            else:
                scaled = min_weight + (1.0 - min_weight) * ((distance - lo) / spread).clamp(0.0, 1.0)
            weight[neg] = scaled.clamp(min_weight, 1.0).to(dtype)
    return weight
