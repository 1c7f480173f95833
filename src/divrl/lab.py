"""Exact tabular laboratory: closed-form optima of regularized RL, best-of-n, exact and sampled
gradients, all on tables small enough to enumerate (methods.md "Closed forms" C1–C6).

A policy is a table of normalized log-probs of shape (..., V): each leading index is a context, the
last dim the vocabulary; −inf is zero mass. Short sequences are tables too: `conditionals[t]` of
shape (V,)*t + (V,) holds π(y_t | y_<t) for every prefix, and `joint_logprobs` enumerates all V^T
sequences. In the closed forms β may be a float or a tensor broadcastable against (..., 1), e.g. a
sweep of shape (B, 1) gives (B, V). Work in float64: the closed forms agree with the numerical
`regularized_optimum` to ~1e-8 in total variation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch

from divrl import divergences, objectives
from divrl.chunked import Head
from divrl.objectives import ObjectiveInputs, expected_advantages, objective_loss
from divrl.rowwise import ModelOutputs
from divrl.spec import ObjectiveSpec

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Estimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def random_problem(
    vocab: int, contexts: tuple[int, ...] = (), seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random toy problem: reference log-probs log_softmax(N(0, 1)) and rewards U(0, 1) (distinct
    with probability 1), both of shape (*contexts, vocab)."""
    gen = torch.Generator().manual_seed(seed)
    ref_logprobs = torch.randn(*contexts, vocab, generator=gen, dtype=dtype).log_softmax(-1)
    reward = torch.rand(*contexts, vocab, generator=gen, dtype=dtype)
    return ref_logprobs, reward


def expected_reward(logprobs: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """E_p[r] = Σ_i p_i r_i per context (zero-mass entries contribute exactly 0; NaN log-probs give
    NaN)."""
    return torch.where(logprobs == -math.inf, 0, logprobs.exp() * reward).sum(-1)


def regularized_value(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    reward: torch.Tensor,
    beta: float,
    divergence: str | Divergence = "reverse_kl",
) -> torch.Tensor:
    """J(p) = Σ p r − β D(p, q) per context; D(lp, lq) from `divrl.divergences` (name or callable),
    e.g. "reverse_kl" KL(p‖q), "forward_kl" KL(q‖p)."""
    d = divergences.get(divergence) if isinstance(divergence, str) else divergence
    return expected_reward(logprobs, reward) - beta * d(logprobs, ref_logprobs)


def tilted(ref_logprobs: torch.Tensor, reward: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """C1: argmax_p Σ p r − β KL(p‖q) = q·exp(r/β)/Z, as log-probs; support = supp(q).

    Also the posterior π* of the Bayesian-inference view (Korbak et al. 2022), and C7's
    extrapolated target with r = log teacher − log ref, β = 1/λ."""
    return torch.log_softmax(ref_logprobs + reward / beta, dim=-1)


def soft_value(ref_logprobs: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """β log Z, Z = Σ q e^{r/β}: the optimal value of C1, and J(π) + β KL(π‖π*) for every π."""
    return beta * torch.logsumexp(ref_logprobs + reward / beta, dim=-1)


def _bisect_decreasing(
    fn: Callable[[torch.Tensor], torch.Tensor], target: float, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """x in [lo, hi] with fn(x) = target for fn decreasing, fn(lo) ≥ target ≥ fn(hi), elementwise
    over a batch; halves the bracket until no midpoint lies strictly inside it."""
    lo, hi = torch.broadcast_tensors(lo, hi)
    while True:
        mid = (lo + hi) / 2
        if not ((lo < mid) & (mid < hi)).any():
            return mid
        above = fn(mid) > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)


def tilted_at_kl(ref_logprobs: torch.Tensor, reward: torch.Tensor, kl: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The C1 tilt whose KL(p‖q) equals `kl`, and its β (shape (..., 1)): KL(tilted_β‖q) falls
    monotonically from −log q(argmax r) (β → 0) to 0 (β → ∞), so bisect on log β within
    spread(r)·e^{±40} (Yang et al., "Asymptotics of language model alignment"); budgets outside
    the range give its ends. The tilt is the most rewarding policy within that KL budget. A reward
    constant on supp(q) tilts nothing: the reference, with β = ∞."""
    reward = reward.expand_as(ref_logprobs)
    on = ref_logprobs > -math.inf
    spread = reward.masked_fill(~on, -math.inf).amax(-1, keepdim=True) - reward.masked_fill(~on, math.inf).amin(
        -1, keepdim=True
    )
    flat = spread == 0
    scale = torch.where(flat, 0, spread.clamp_min(torch.finfo(reward.dtype).tiny).log())

    def kl_of_tilt(log_beta: torch.Tensor) -> torch.Tensor:
        lp = tilted(ref_logprobs, reward, log_beta.exp())
        return divergences.reverse_kl(lp, ref_logprobs).unsqueeze(-1)

    beta = _bisect_decreasing(kl_of_tilt, kl, scale - 40, scale + 40).exp().masked_fill(flat, math.inf)
    return tilted(ref_logprobs, reward, beta), beta


def forward_kl_optimum(ref_logprobs: torch.Tensor, reward: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """C3: argmax_p Σ p r − β KL(q‖p), as log-probs.

    Stationarity r_i + β q_i/p_i = λ gives the hyperbolic tilt p_i = β q_i/(λ − r_i) on supp(q),
    where λ₀ > max_{q>0} r is the root of Σ_{q>0} β q_i/(λ − r_i) = 1 (bisection on
    (max r, max r + β]). KL(q‖p) does not charge mass outside supp(q): with r_off = max_{q=0} r the
    multiplier is λ = max(λ₀, r_off), and when r_off > λ₀ the leftover
    1 − Σ_{q>0} β q_i/(r_off − r_i) goes to the off-support argmax (split equally among ties; any
    split is optimal): the "escape the reference support" property (RAPO)."""
    reward = reward.expand_as(ref_logprobs)
    q = ref_logprobs.exp()
    on = q > 0
    r_on = reward.masked_fill(~on, -math.inf).amax(-1, keepdim=True)
    r_off = reward.masked_fill(on, -math.inf).amax(-1, keepdim=True)

    def hyperbolic(lam: torch.Tensor) -> torch.Tensor:
        return torch.where(on, beta * q / (lam - reward), 0)

    def mass(lam: torch.Tensor) -> torch.Tensor:
        return hyperbolic(lam).sum(-1, keepdim=True)

    lam0 = _bisect_decreasing(mass, 1, r_on, r_on + beta)
    p = hyperbolic(torch.maximum(lam0, r_off))
    escape = ~on & (reward == r_off) & (r_off > lam0)
    leftover = (1 - p.sum(-1, keepdim=True)).clamp_min(0)
    p = p + torch.where(escape, leftover / escape.sum(-1, keepdim=True).clamp_min(1), 0)
    return (p / p.sum(-1, keepdim=True)).log()


def chi2_optimum(ref_logprobs: torch.Tensor, reward: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """C4: argmax_p Σ p r − β χ²(p‖q), χ² = Σ (p − q)²/q, as log-probs.

    With p ≥ 0, stationarity gives p_i = q_i·max(0, 1 + (r_i − λ)/(2β)), λ the root of
    Σ q_i max(0, 1 + (r_i − λ)/(2β)) = 1 (decreasing; bracket [Σ q r, max_{q>0} r], bisection).
    For 2β ≥ Σ q r − min_{q>0} r nothing is clipped (linear tilt); smaller β zeroes low-reward
    tokens exactly. Support ⊆ supp(q)."""
    reward = reward.expand_as(ref_logprobs)
    q = ref_logprobs.exp()
    on = q > 0
    mean = (q * reward.masked_fill(~on, 0)).sum(-1, keepdim=True)
    r_on = reward.masked_fill(~on, -math.inf).amax(-1, keepdim=True)

    def clipped_linear(lam: torch.Tensor) -> torch.Tensor:
        return torch.where(on, q * (1 + (reward - lam) / (2 * beta)).clamp_min(0), 0)

    lam = _bisect_decreasing(lambda lam: clipped_linear(lam).sum(-1, keepdim=True), 1, mean, r_on)
    p = clipped_linear(lam)
    return (p / p.sum(-1, keepdim=True)).log()


CLOSED_FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "reverse_kl": tilted,
    "forward_kl": forward_kl_optimum,
    "chi2": chi2_optimum,
}
"""Closed-form argmax_p Σ p r − β D(p, q), keyed by the `divrl.divergences` name of D."""


def regularized_optimum(
    ref_logprobs: torch.Tensor,
    reward: torch.Tensor,
    beta: float,
    divergence: str | Divergence,
    *,
    method: str = "lbfgs",
    steps: int = 2000,
    lr: float | None = None,
) -> torch.Tensor:
    """argmax_p Σ p r − β D(p, q) over the simplex, numerically, for any D(lp, lq) (a
    `divrl.divergences` name or callable): p = softmax(θ), exact autograd gradients in the dtype of
    `ref_logprobs` (use float64), LBFGS with strong-Wolfe line search (lr 1) or Adam (lr 0.05).
    Contexts (leading dims) are independent; their objectives are summed. Returns log-probs.

    If D(uniform, q) is infinite (f′(∞) = ∞, e.g. reverse KL or χ² when q has zeros), tokens
    outside supp(q) are held at zero mass, where the optimum keeps them (C2). D must be smooth in
    p: at a kink (total variation at p_i = q_i) the quasi-Newton steps stall short of the optimum."""
    d = divergences.get(divergence) if isinstance(divergence, str) else divergence
    reward = reward.expand_as(ref_logprobs)
    uniform = torch.full_like(ref_logprobs, -math.log(ref_logprobs.shape[-1]))
    support = torch.ones_like(ref_logprobs, dtype=torch.bool)
    if not torch.isfinite(d(uniform, ref_logprobs)).all():
        support = ref_logprobs > -math.inf
    theta = torch.zeros_like(ref_logprobs, requires_grad=True)

    def policy() -> torch.Tensor:
        return theta.masked_fill(~support, -math.inf).log_softmax(-1)

    def loss() -> torch.Tensor:  # −J/β: the curvature of β·D no longer shrinks with β
        return -regularized_value(policy(), ref_logprobs, reward, beta, d).sum() / beta

    if method == "lbfgs":
        opt = torch.optim.LBFGS(
            [theta],
            lr=lr or 1.0,
            max_iter=steps,
            max_eval=2 * steps,
            history_size=50,
            tolerance_grad=1e-13,
            tolerance_change=1e-16,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = loss()
            value.backward()
            return value

        opt.step(closure)
    elif method == "adam":
        adam = torch.optim.Adam([theta], lr=lr or 0.05)
        for _ in range(steps):
            adam.zero_grad()
            loss().backward()
            adam.step()
    else:
        raise ValueError(f"method must be 'lbfgs' or 'adam', got {method!r}")
    return policy().detach()


def best_of_n(ref_probs: torch.Tensor, reward: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """Exact law (probabilities) of the highest-reward of n i.i.d. draws from q, ties broken
    uniformly at random. With F(v) = q(r ≤ v), F(v⁻) = q(r < v):
    P(i) = q_i·(F(r_i)ⁿ − F(r_i⁻)ⁿ)/q(r = r_i); for distinct rewards F(r_i)ⁿ − (F(r_i) − q_i)ⁿ.
    `n` may be a tensor broadcastable against (..., 1). (Beirami et al. 2024, methods.md C5.)"""
    reward, ref_probs = torch.broadcast_tensors(reward, ref_probs)
    sorted_reward, order = reward.sort(dim=-1)
    cdf = torch.nn.functional.pad(ref_probs.gather(-1, order).cumsum(-1), (1, 0))
    below_or_at = cdf.gather(-1, torch.searchsorted(sorted_reward, reward.contiguous(), right=True))
    below = cdf.gather(-1, torch.searchsorted(sorted_reward, reward.contiguous(), right=False))
    level = below_or_at - below
    return torch.where(level > 0, ref_probs * (below_or_at**n - below**n) / level, 0)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ ref) = log n − (n − 1)/n for a continuous reward law (density ratio
    n·F^{n−1}); an upper bound with ties or a finite support (Beirami et al. 2024, C5)."""
    return math.log(n) - (n - 1) / n


def inpo_step(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, preference: torch.Tensor, eta: float, tau: float
) -> torch.Tensor:
    """INPO's round (Zhang et al. 2024, arXiv 2407.00617; `divrl.preferences`): the minimizer of
    its pairwise loss on pairs from π_t, log π_{t+1} = (1 − τ/η)·log π_t + (τ/η)·log π_ref +
    P(y ≻ π_t)/η − log Z, with P(y ≻ π_t) = Σ_y′ π_t(y′)·P[y, y′] for a preference matrix
    P[y, y′] = P(y ≻ y′) (P + Pᵀ = 1). Its fixed point is π* ∝ π_ref·exp(P(y ≻ π*)/τ)."""
    win_rate = preference @ logprobs.exp()
    return ((1 - tau / eta) * logprobs + (tau / eta) * ref_logprobs + win_rate / eta).log_softmax(-1)


def divergence_gradient(logits: torch.Tensor, ref_logprobs: torch.Tensor, divergence: str | Divergence) -> torch.Tensor:
    """Exact ∇_θ Σ_contexts D(log_softmax(θ), q) by autograd."""
    d = divergences.get(divergence) if isinstance(divergence, str) else divergence
    theta = logits.detach().requires_grad_()
    (grad,) = torch.autograd.grad(d(theta.log_softmax(-1), ref_logprobs).sum(), theta)
    return grad


def sampled_gradient(
    logits: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: Estimator,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo gradient of a sampled estimator used as a loss: draw y ~ p = softmax(θ)
    (sampling not differentiated), autograd each sample's estimator(log p(y), log q(y)) w.r.t. θ,
    return (mean, standard error) over samples, each shaped like θ.
    C6: k1 → 0, k2 → ∇KL(p‖q), k3 → ∇KL(q‖p) in expectation."""
    vocab = logits.shape[-1]
    probs = logits.detach().softmax(-1).reshape(-1, vocab)
    tokens = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    tokens = tokens.T.reshape(num_samples, *logits.shape[:-1], 1)
    theta = logits.detach().expand(num_samples, *logits.shape).clone().requires_grad_()
    lp_y = theta.log_softmax(-1).gather(-1, tokens)
    lq_y = ref_logprobs.expand_as(theta).gather(-1, tokens)
    (per_sample,) = torch.autograd.grad(estimator(lp_y, lq_y).sum(), theta)
    return per_sample.mean(0), per_sample.std(0) / math.sqrt(num_samples)


def joint_logprobs(conditionals: list[torch.Tensor]) -> torch.Tensor:
    """log P(y_1..y_T) = Σ_t log π(y_t | y_<t) over all V^T sequences, shape (V,)*T, from
    per-prefix tables conditionals[t] of shape (V,)*t + (V,)."""
    length = len(conditionals)
    # sum() starts from the int 0, so its type is Tensor | int; a non-empty list gives a Tensor
    return cast(torch.Tensor, sum(c.reshape(c.shape + (1,) * (length - 1 - t)) for t, c in enumerate(conditionals)))


def soft_bellman(ref_conditionals: list[torch.Tensor], reward: torch.Tensor, beta: float) -> list[torch.Tensor]:
    """Token-level optimum of sequence-level KL-RL with reward r(y_1..y_T) (shape (V,)*T), by the
    soft Bellman backup V_T = r, π(y_t|y_<t) ∝ π_ref(y_t|y_<t)·exp(V_{t+1}(y_≤t)/β),
    V_t = β log Σ π_ref e^{V_{t+1}/β}. Its joint is C1 applied to whole sequences; with T = 1 it is
    C1 itself (demonstration-regularized RL, H = 1)."""
    value = reward
    policy: list[torch.Tensor] = []
    for ref in reversed(ref_conditionals):
        policy.insert(0, tilted(ref, value, beta))
        value = soft_value(ref, value, beta)
    return policy


def _bandit_step(
    spec: ObjectiveSpec,
    theta: torch.Tensor,
    contexts: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    rewards: torch.Tensor,
    token_scale: torch.Tensor,
    group_pass_rate: torch.Tensor,
    models: dict[str, torch.Tensor],
    lr: float,
) -> None:
    """One gradient step of `objective_loss` on θ (C, V), each row a one-token completion of
    context ``contexts[row]``: hidden state onehot(context), output weight θᵀ."""
    hidden = torch.eye(theta.shape[0], dtype=theta.dtype)[contexts]
    frozen = {name: ModelOutputs(hidden, Head(table.T)) for name, table in models.items()}
    inputs = ObjectiveInputs(
        policy=ModelOutputs(hidden, Head(theta.T)),
        tokens=tokens,
        rows=torch.arange(len(tokens)),
        advantages=advantages,
        rewards=rewards,
        group_pass_rate=group_pass_rate,
        token_scale=token_scale,
        models=frozen,
    )
    (grad,) = torch.autograd.grad(objective_loss(spec, inputs).loss, theta)
    with torch.no_grad():
        theta -= lr * grad


def objective_fixed_point(
    spec: ObjectiveSpec,
    reward: torch.Tensor,
    models: dict[str, torch.Tensor],
    *,
    init: torch.Tensor | None = None,
    steps: int = 4000,
    lr: float = 1.0,
) -> torch.Tensor:
    """Where `divrl.objectives.objective_loss` — the function the trainer runs — leads a bandit,
    in expectation.

    A tabular policy is a linear model over one-hot contexts: hidden states eye(C), output
    weight θᵀ (V, C), so θ (C, V) is the table of logits. Every (context, token) pair is one
    completion of one token, weighted by its detached probability (`token_scale` = πθ(v|c)) and
    given the spec's advantage for an infinite group (`expected_advantages`; with `mean_only`,
    r − E_πθ[r]), so the objective's gradient is the exact gradient of Σ_c E_πθ[r] (when
    `spec.policy_gradient`) minus its divergence terms, each D(πθ(·|c), q(·|c)) counted once per
    context. `models` maps target model names (reference, teacher) to finite (C, V) log-prob
    tables. Plain gradient steps on θ from `init` (default the reference's logits, else zeros);
    returns the policy's log-probs (C, V).
    """
    contexts, vocab = reward.shape
    theta = (models.get("reference", torch.zeros_like(reward)) if init is None else init).detach().clone()
    theta.requires_grad_()
    rows = torch.arange(contexts).repeat_interleave(vocab)  # row c·V + v
    tokens = torch.arange(vocab).repeat(contexts)
    for _ in range(steps):
        with torch.no_grad():
            probs = theta.softmax(-1)
            advantage = expected_advantages(spec, reward, probs)
            pass_rate = objectives.passed(reward).to(probs.dtype)
            pass_rate = (probs * pass_rate).sum(-1, keepdim=True).expand_as(probs)
        _bandit_step(
            spec,
            theta,
            rows,
            tokens,
            advantage.reshape(-1),
            reward.reshape(-1),
            probs.reshape(-1),
            pass_rate.reshape(-1),
            models,
            lr,
        )
    return theta.detach().log_softmax(-1)


def objective_sampled_steps(
    spec: ObjectiveSpec,
    reward: torch.Tensor,
    models: dict[str, torch.Tensor],
    *,
    init: torch.Tensor,
    steps: int,
    group_size: int,
    lr: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`steps` training steps of the trainer's own pipeline on a bandit with finite groups: per
    step and context, ``group_size`` answers are drawn from πθ, scored, given the spec's
    advantages (`objectives.advantages`, group by group) and aggregated by its `token_scale`,
    then θ takes one gradient step of `objective_loss`. Returns the policy's log-probs (C, V)."""
    contexts, _vocab = reward.shape
    theta = init.detach().clone().requires_grad_()
    rows = torch.arange(contexts).repeat_interleave(group_size)
    for _ in range(steps):
        with torch.no_grad():
            tokens = torch.multinomial(theta.softmax(-1), group_size, replacement=True, generator=generator).reshape(-1)
            rewards = reward[rows, tokens]
            advantage = objectives.advantages(spec, rewards, None, group_size)
            pass_rate = objectives.group_pass_rate(objectives.passed(rewards), group_size)
            scale = objectives.token_scale(spec, [1] * len(tokens)).to(theta.dtype)
        _bandit_step(spec, theta, rows, tokens, advantage, rewards, scale, pass_rate, models, lr)
    return theta.detach().log_softmax(-1)
