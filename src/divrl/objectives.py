"""One objective function: the policy-gradient term plus any divergence terms, on flat tokens.

Per token t of completion i (design.md §1), for an `ObjectiveSpec`:

    L = Σ_t a_t · [ w_t m_t ℓ_PG(t) + Σ_k c_k w_kt m_kt D_k(t) ],
    ℓ_PG(t) = −min(ρ_t A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_i),   ρ_t = πθ(y_t|s_t)/πold(y_t|s_t)

with a_t the aggregation weight (`token_scale`), w/m the `divrl.weights` of each term and D_k the
exact divergence to its target over the vocabulary (`divrl.chunked` for a plain model target,
`divrl.rowwise` for any target expression) or a sampled estimator of KL(πθ‖q_k). Terms placed in
the reward are subtracted from the return before the advantage (`advantages`).

Sources: GRPO (Shao et al. 2024) for group-normalized advantages; DAPO (Yu et al. 2025) for
clip-higher and token-level aggregation; Dr. GRPO (Liu et al. 2025) for the mean-only advantage
and the constant normalizer (``seq_mean_token_sum_norm``; verl's names for the aggregations).

The trainer computes model outputs (`ObjectiveInputs`) and calls `objective_loss`; the exact
tabular lab (`divrl.lab.objective_fixed_point`) calls the same function on tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import cast

import torch

from divrl import chunked, divergences, rowwise, surrogates, weights
from divrl.rowwise import ModelOutputs
from divrl.spec import EntropyAnchorSpec, ObjectiveSpec, TermSpec


def group_advantages(
    rewards: torch.Tensor, group_size: int, normalize: bool = True, eps: float = 1e-6, population_std: bool = False
) -> torch.Tensor:
    """Advantages of rewards laid out group-major (P·G,): r − mean_group, divided by the group's
    std when `normalize`: the sample std (unbiased, as GRPO) or, with `population_std`, the
    population std (ReasonMaxxer's code). A group with equal rewards gets zeros."""
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize:
        centered = centered / (grouped.std(dim=1, keepdim=True, correction=0 if population_std else 1) + eps)
    return centered.reshape(-1)


PASS_THRESHOLD = 1.0 - 1e-9  # a sample passes when its reward is 1 (full score)


def passed(rewards: torch.Tensor) -> torch.Tensor:
    """Whether each reward is a full score (pass@k, pass rates and `signed` advantages use it)."""
    return rewards >= PASS_THRESHOLD


def signed_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """+1 for a passing sample, −1 otherwise, no baseline: the ±1-reward REINFORCE of PSR/NSR
    (Zhu et al. 2025); their weighting λ on positives is a `pg_weight` (`asymmetric`)."""
    return torch.where(passed(rewards), 1.0, -1.0).to(torch.promote_types(rewards.dtype, torch.float32))


def overlong_penalty(spec: ObjectiveSpec, lengths: torch.Tensor) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476 §3.4), ≤ 0 per completion:
    with L_max = max_new_tokens and a buffer of L_c = overlong_buffer·L_max tokens,
    −overlong_penalty·clamp((|y| − (L_max − L_c))/L_c, 0, 1): 0 up to L_max − L_c, then linear
    down to −overlong_penalty at L_max (where completions are cut)."""
    if not spec.overlong_buffer:
        return torch.zeros(len(lengths))
    buffer = spec.overlong_buffer * spec.max_length
    excess = (lengths.float() - (spec.max_length - buffer)) / buffer
    return -spec.overlong_penalty * excess.clamp(0.0, 1.0)


def advantages(
    spec: ObjectiveSpec,
    rewards: torch.Tensor,
    penalties: torch.Tensor | None,
    group_size: int,
    verdict: torch.Tensor | None = None,
) -> torch.Tensor:
    """A_i = adv(r)_i − (P_i − mean_group P): the task reward's advantage (`group_norm`,
    `mean_only` or `signed`) minus the group-centred penalty P_i = Σ_k c_k Σ_t k(y_t) of the
    reward terms; `advantage_std` picks the std of `group_norm`, and a nonzero `advantage_clip`
    clips the result to ±advantage_clip (ReasonMaxxer: population std, ±2.5).

    The penalty is not divided by the reward's std: subtracting it before the division would make
    c irrelevant in a group of equal rewards (the advantage would be a unit-scale function of the
    KL alone). For `mean_only` this equals the advantage of r − P. `signed` reads the task's pass
    verdict (default: rewards ≥ 1), so reward shaping cannot turn a pass into a failure.
    """
    if spec.advantage == "signed":
        adv = signed_advantages(rewards if verdict is None else verdict.to(rewards.dtype))
    elif spec.advantage == "none":  # no task-reward term (e.g. OPD's dense reward alone)
        adv = torch.zeros_like(rewards, dtype=torch.promote_types(rewards.dtype, torch.float32))
    else:
        adv = group_advantages(
            rewards,
            group_size,
            normalize=spec.advantage == "group_norm",
            population_std=spec.advantage_std == "population",
        )
    if penalties is not None:
        adv = adv - group_advantages(penalties, group_size, normalize=False)
    return _clip_advantages(spec, adv)


def _clip_advantages(spec: ObjectiveSpec, adv: torch.Tensor) -> torch.Tensor:
    return adv.clamp(-spec.advantage_clip, spec.advantage_clip) if spec.advantage_clip else adv


def expected_advantages(
    spec: ObjectiveSpec, rewards: torch.Tensor, probs: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The advantage of each outcome of a bandit (…, V) with an infinite group drawn from probs:
    `mean_only` r − E r, `group_norm` (r − E r)/(std r + eps), `signed` ±1 (for `divrl.lab`);
    clipped as `advantages` clips."""
    if spec.advantage == "signed":
        return signed_advantages(rewards)
    if spec.advantage == "none":
        return torch.zeros_like(probs)
    centred = rewards - (probs * rewards).sum(-1, keepdim=True)
    if spec.advantage == "group_norm":
        centred = centred / ((probs * centred**2).sum(-1, keepdim=True).sqrt() + eps)
    return _clip_advantages(spec, centred)


def token_scale(spec: ObjectiveSpec, lengths: list[int]) -> torch.Tensor:
    """a_t per flat token of completions of these lengths: the loss is Σ_t a_t ℓ_t.

    token_mean 1/Σ_i L_i; seq_mean_token_mean 1/(B·L_i); seq_mean_token_sum 1/B;
    seq_mean_token_sum_norm 1/(B·C), C = loss_normalizer (Dr. GRPO: the generation budget).
    """
    n_seq, lengths_t = len(lengths), torch.tensor(lengths, dtype=torch.float32)
    per_seq = {
        "token_mean": torch.full((n_seq,), 1.0 / max(1, sum(lengths))),
        "seq_mean_token_mean": 1.0 / (n_seq * lengths_t.clamp(min=1)),
        "seq_mean_token_sum": torch.full((n_seq,), 1.0 / n_seq),
        "seq_mean_token_sum_norm": torch.full((n_seq,), 1.0 / (n_seq * spec.normalizer)),
    }
    return per_seq[spec.aggregation].repeat_interleave(lengths_t.long())


def group_pass_rate(passed: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) fraction of each completion's group that passed."""
    return passed.float().view(-1, group_size).mean(1).repeat_interleave(group_size)


@dataclass
class PromptPositions:
    """The positions that predict the prompts' tokens 2..L (teacher-forced), for terms with
    ``prompt_positions``; each counts once per completion of its prompt, as in a batch of whole
    prompt + completion sequences."""

    policy: ModelOutputs  # hidden states with gradient, the policy's head
    models: dict[str, ModelOutputs]  # reference / teacher at the same positions, no gradient
    multiplicity: torch.Tensor  # (M,) completions of the position's prompt in the micro-batch
    token_weight: float  # a_t of a position per completion: the whole batch's mean completion-token a_t


@dataclass
class ObjectiveInputs:
    """What the objective needs of a (micro-)batch of N flat completion tokens of B completions."""

    policy: ModelOutputs  # hidden states with gradient, the policy's head (at the sampling temperature)
    tokens: torch.Tensor  # (N,)
    rows: torch.Tensor  # (N,) long: index of each token's completion in 0..B−1
    advantages: torch.Tensor  # (B,)
    rewards: torch.Tensor  # (B,)
    group_pass_rate: torch.Tensor  # (B,)
    token_scale: torch.Tensor  # (N,) aggregation weights a_t
    old_logprobs: torch.Tensor | None = None  # (N,) behaviour log-probs; None: on-policy (πθ detached)
    models: dict[str, ModelOutputs] = field(default_factory=dict)  # reference/teacher/old, no gradient
    batch_pass_rate: float | None = None  # fraction of the whole batch's completions that passed
    passed: torch.Tensor | None = None  # (B,) bool: full task score (default: rewards ≥ 1)
    groups: torch.Tensor | None = None  # (B,) long: the prompt (group) of each completion
    entropy_anchor: float | None = None  # SIREN's H₀ (None: not set yet, the regularizer is 0)
    stored_logprobs: torch.Tensor | None = None  # (N,) log q(y_t) of stored responses of q
    diversity: torch.Tensor | None = None  # (B,) DSDR's clipped global diversity (diversity_bonus)
    prompt: PromptPositions | None = None  # for terms with prompt_positions
    batch_fraction: float = 1.0  # this micro-batch's share of the batch's completions
    monitor_kl: bool = True  # run the `kl` metric's own divergence pass when no term computes the KL

    def passed_completions(self) -> torch.Tensor:
        return passed(self.rewards) if self.passed is None else self.passed


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar with gradient
    token_sums: dict[str, float]  # Σ over the tokens of per-token quantities (means once divided by N)
    loss_parts: dict[str, float]  # each term's contribution to the loss
    logprobs: torch.Tensor | None = None  # (N,) log πθ of the tokens, detached (the next iteration's πold)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (bf16 log-probs are summed in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _models(inputs: ObjectiveInputs) -> dict[str, ModelOutputs]:
    """The inputs' models plus `self` (the policy detached); `old` defaults to it (on-policy)."""
    own = inputs.policy.detach()
    return {"self": own, "old": own, **inputs.models}


def _model_logprobs(model: ModelOutputs, tokens: torch.Tensor) -> torch.Tensor:
    if model.token_logprobs is not None:
        return model.token_logprobs
    with torch.no_grad():
        return chunked.logprob_entropy(model.hidden, model.head, tokens)[0]


def _sampled_target_logprobs(term: TermSpec, inputs: ObjectiveInputs, models) -> torch.Tensor:
    if term.target.is_model:
        return _model_logprobs(models[term.target.op], inputs.tokens)
    return rowwise.target_logprob_at(
        term.target, inputs.policy, models, inputs.tokens, inputs.advantages[inputs.rows], inputs.rewards[inputs.rows]
    )


def _params(term: TermSpec, policy: ModelOutputs) -> dict:
    params = term.kwargs
    if params.get("cost") == "embedding":  # Sinkhorn's ground cost from the config
        params["cost"] = divergences.embedding_cost(policy.head.weight.detach())
    return params


def _exact(term: TermSpec, inputs: ObjectiveInputs, models, token_weights: torch.Tensor | None) -> torch.Tensor:
    """Exact D(πθ, q) per token: fused tiles for a model target, row chunks for the rest."""
    policy = inputs.policy
    if term.target.is_model and divergences.is_pointwise(term.divergence):
        target = models[term.target.op]
        return chunked.divergence(
            term.divergence,
            policy.hidden,
            policy.head,
            target.hidden,
            target.head,
            token_weights=token_weights,
            **term.kwargs,
        )
    return rowwise.divergence_to_target(
        divergences.get(term.divergence),
        term.target,
        policy,
        models,
        inputs.tokens,
        inputs.advantages[inputs.rows],
        inputs.rewards[inputs.rows],
        **_params(term, policy),
    )


def stored_estimate(name: str, params: dict, logprobs: torch.Tensor, stored_logprobs: torch.Tensor) -> torch.Tensor:
    """D(πθ‖q) = Σ_v q_v f(p_v/q_v) per token from a token y sampled from q, with log q(y) stored
    (DPH-RL, Huang et al.; official code seamoke/DPH-RL): f(u) − f′(1)(u − 1), u = πθ(y)/q(y).
    f(u) = term(log p, log q)/q for the divergence's pointwise term; the control variate
    −f′(1)(u − 1) has zero mean and zero mean gradient under q and makes each sample ≥ 0 for convex
    f. Forward KL gives u − 1 − log u (DPH-F); jsd(0.5) gives ½[u log u − (u + 1) log((u + 1)/2)]
    (DPH-JS is twice it: use coef 2η)."""
    term = divergences.pointwise(name, **params)
    with torch.enable_grad():
        at_one = torch.tensor(math.log(0.5), dtype=torch.float64, requires_grad=True)
        (slope,) = torch.autograd.grad(term(at_one, torch.tensor(math.log(0.5), dtype=torch.float64)), at_one)
    f_prime_one = float(slope) / 0.5  # ∂term/∂log p = p·f′(p/q) at p = q = ½
    f_of_u = term(logprobs, stored_logprobs) * torch.exp(-stored_logprobs)
    return f_of_u - f_prime_one * torch.expm1(logprobs - stored_logprobs)


def sequence_chi2(
    logprobs: torch.Tensor, target_logprobs: torch.Tensor, rows: torch.Tensor, n_completions: int
) -> torch.Tensor:
    """Pearson χ²(πθ‖q) between whole completions, per token of completion i: the value w_i − 1
    with w_i = exp Σ_{t∈i}(log πθ(y_t) − log q(y_t)), unbiased for χ² = E_πθ[w] − 1 on samples of
    πθ; the gradient 2(w_i − 1)∇log πθ(y_t), whose expectation is ∇χ² (the baseline −1 keeps it 0
    at πθ = q). Summed over a completion's tokens with seq_mean_token_sum aggregation, it is the
    unbiased estimate of c·∇χ² over sequences (ORPO, Laidlaw et al., arXiv 2403.03185, regularizes
    the χ² of occupancy measures; this is its sequence-level Monte-Carlo form)."""
    log_w = torch.zeros(n_completions, dtype=logprobs.dtype, device=logprobs.device).index_add(
        0, rows, (logprobs - target_logprobs).detach()
    )
    excess = torch.expm1(log_w)[rows]
    return excess + 2 * excess * (logprobs - logprobs.detach())


def entropy_anchor(spec: EntropyAnchorSpec, inputs: ObjectiveInputs) -> tuple[torch.Tensor, float, float]:
    """SIREN's regularizer on one micro-batch (Linn3a/siren ``dp_actor.py``; methods notes):
    H̃_t = the top-p entropy (`rowwise.top_p_entropy`); within each completion the tokens with
    H̃_t above its `quantile` (torch.quantile, linear) are kept; H̄ = mean over completions of the
    kept tokens' mean H̃ (seq-mean-token-mean; completions with none kept are left out); the
    loss is coef·(H̄ − H₀)² per micro-batch, weighted by its share of the batch (the official code
    averages it over micro-batches). Returns (loss, H̄, kept fraction); loss 0 while H₀ is unset."""
    entropy = rowwise.top_p_entropy(inputs.policy, spec.top_p, spec.top_k)
    detached = entropy.detach()
    kept = torch.zeros_like(detached, dtype=torch.bool)
    per_completion = []
    for row in inputs.rows.unique():
        tokens = inputs.rows == row
        kept[tokens] = detached[tokens] > torch.quantile(detached[tokens].double(), spec.quantile).to(detached.dtype)
        if kept[tokens].any():
            per_completion.append(entropy[tokens & kept].mean())
    mean_entropy = torch.stack(per_completion).mean() if per_completion else entropy.sum() * 0.0
    if inputs.entropy_anchor is None:
        loss = mean_entropy * 0.0
    else:
        loss = spec.coef * inputs.batch_fraction * (mean_entropy - inputs.entropy_anchor) ** 2
    return loss, float(mean_entropy.detach()), float(kept.float().mean()) if len(kept) else 0.0


def td_residual(sampled_logits: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, gamma: float) -> torch.Tensor:
    """r_t = Q(s_t, y_t) − γ·V(s_{t+1}) per flat token (N,), reading the logits as soft Q-values
    (IRL imitation, Wulfmeier et al. 2024, arXiv 2409.01369; IQLearn, Garg et al. 2021):
    Q(s_t, y_t) = z_{y_t} (`sampled_logits`), V(s) = logsumexp z = `lse`, so that
    Q − V = log π. s_{t+1} is the next token's position of the same completion (`rows`: the
    tokens of a completion are contiguous and in order, as `ObjectiveInputs` lays them out);
    after a completion's last token the state is terminal, V = 0 (IQLearn's (1 − done) mask).
    r_t is the reward the soft-Q function implies; differentiable through both Q and V."""
    same = rows[1:] == rows[:-1]
    zero = lse.new_zeros(1)
    next_value = torch.cat([torch.where(same, lse[1:], 0.0), zero])
    return sampled_logits - gamma * next_value


def _reference_at_tokens(inputs: ObjectiveInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π_ref(y_t), H(π_ref)(s_t)) per token: precomputed by the trainer, or computed here."""
    reference = inputs.models["reference"]
    if reference.token_logprobs is not None and reference.token_entropy is not None:
        return reference.token_logprobs, reference.token_entropy
    with torch.no_grad():
        return chunked.logprob_entropy(reference.hidden, reference.head, inputs.tokens)


def _stats(spec: ObjectiveSpec, inputs: ObjectiveInputs, logprobs, entropy, old) -> weights.TokenStats:
    ref_logprobs, ref_entropy = _reference_at_tokens(inputs) if spec.reads_reference else (None, None)
    ref_kl = None
    if spec.uses_weight("reference_kl_quantile"):
        reference = inputs.models["reference"]
        with torch.no_grad():
            ref_kl = chunked.divergence(
                "reverse_kl",
                inputs.policy.hidden.detach(),
                inputs.policy.head.detach(),
                reference.hidden,
                reference.head,
            )
    return weights.TokenStats(
        rows=inputs.rows,
        advantages=inputs.advantages,
        rewards=inputs.rewards,
        group_pass_rate=inputs.group_pass_rate,
        batch_pass_rate=inputs.batch_pass_rate,
        passed=inputs.passed_completions(),
        groups=inputs.groups,
        entropy=entropy.detach(),
        logprobs=logprobs.detach(),
        old_logprobs=old,
        ref_logprobs=ref_logprobs,
        reference_entropy=ref_entropy,
        diversity=inputs.diversity,
        reference_kl=ref_kl,
        hidden=inputs.policy.hidden.detach(),
    )


def _mask_and_weight(
    name: str, mask, weight, stats, sums: dict, scale: torch.Tensor, mask_mean: bool = False, unmasked: float = 0.0
) -> tuple[torch.Tensor | None, float]:
    """(m·w·f per token (None when the term has neither), f); logs masked fraction and mean weight.

    f = 1, or with `mask_mean` Σ_t a_t / (Σ_t a_t m_t + unmasked) (a_t = `scale`; `unmasked` the
    weight of positions outside the mask's reach, the prompt's), so the term is averaged over the
    positions it keeps instead of over all tokens: with token_mean aggregation, mean_{t: m_t=1};
    0 when it keeps none. Per micro-batch (exact for the batch when micro_batch_size covers it)."""
    if not mask and not weight:
        return None, 1.0
    n = len(stats.rows)
    m = weights.compute(mask, stats) if mask else torch.ones(n, device=stats.rows.device)
    w = weights.compute(weight, stats) if weight else torch.ones(n, device=stats.rows.device)
    if mask:
        sums[f"{name}_masked_fraction"] += float((m == 0).sum())
    if weight:
        sums[f"{name}_mean_weight"] += float(w.sum())
        if any(n == "resrl" for n, _ in weight):  # ResRL's metric: the mean weight of failed tokens
            assert stats.passed is not None  # `_stats` always sets it
            failing = ~stats.passed[stats.rows]
            sums[f"{name}_failed_weight_sum"] += float(w[failing].sum())
            sums[f"{name}_failed_tokens"] += float(failing.sum())
    factor = 1.0
    if mask_mean:
        kept = float((scale * m).sum()) + unmasked
        factor = float(scale.sum()) / kept if kept > 0 else 0.0
    return m * w * factor, factor


def _prompt_weights(term: TermSpec, inputs: ObjectiveInputs, scale: torch.Tensor) -> torch.Tensor | None:
    """a_t of the prompt positions of a `prompt_positions` term: the whole batch's mean
    completion-token weight (not this micro-batch's: the loss must not depend on the micro-batch
    size), times the position's multiplicity (None when the term or the inputs have none)."""
    if not term.prompt_positions or inputs.prompt is None or not len(scale):
        return None
    return inputs.prompt.multiplicity.to(scale.dtype) * inputs.prompt.token_weight


def _read(term: TermSpec, target_logprobs: torch.Tensor | None) -> torch.Tensor:
    """The target's log-probs of the tokens, which every estimator but `exact` reads."""
    if target_logprobs is None:  # only a stored term can lack them: ObjectiveInputs.stored_logprobs unset
        raise ValueError(f"term {term.name!r} ({term.estimator}) needs ObjectiveInputs.stored_logprobs")
    return target_logprobs


def _at_prompt(term: TermSpec, prompt: PromptPositions, token_weights: torch.Tensor) -> torch.Tensor:
    """Σ_t a_t D(πθ, q)(s_t) over the prompt's positions (exact, q a model)."""
    target = prompt.models[term.target.op]
    value = chunked.divergence(
        term.divergence,
        prompt.policy.hidden,
        prompt.policy.head,
        target.hidden,
        target.head,
        token_weights=token_weights.detach(),
        **term.kwargs,
    )
    return (token_weights * _wide(value)).sum()


def objective_loss(spec: ObjectiveSpec, inputs: ObjectiveInputs) -> ObjectiveOutput:
    """The loss of one (micro-)batch and its metric sums; see the module docstring."""
    policy, models = inputs.policy, _models(inputs)
    if spec.td_regularizer is None:
        logprobs, entropy = chunked.logprob_entropy(policy.hidden, policy.head, inputs.tokens)
    else:  # the same pass, with Q(s, y) = z_y and V(s) = lse apart: log p = z_y − lse exactly
        sampled_logits, lse, entropy = chunked.logit_lse_entropy(policy.hidden, policy.head, inputs.tokens)
        logprobs = sampled_logits - lse
    old = logprobs.detach() if inputs.old_logprobs is None else inputs.old_logprobs
    stats = _stats(spec, inputs, logprobs, entropy, old)
    scale = inputs.token_scale
    sums: dict[str, float] = defaultdict(float)
    parts: dict[str, torch.Tensor] = {}
    sums["entropy"] = float(entropy.detach().sum())
    sampled = {
        t.name: _sampled_target_logprobs(t, inputs, models)  # log q(y_t), once per term
        for t in spec.terms
        if t.estimator not in ("exact", "stored")
    }

    if spec.policy_gradient:
        token_advantages = inputs.advantages[inputs.rows] + token_reward(spec, sampled, old)
        teacher = (
            _model_logprobs(models["teacher"], inputs.tokens) if spec.pg_loss in surrogates.READS_TEACHER else None
        )
        tokens = surrogates.PolicyTokens(
            _wide(logprobs),
            _wide(old),
            token_advantages,
            inputs.passed_completions()[inputs.rows],
            inputs.group_pass_rate[inputs.rows],
            inputs.rows,
            teacher,
        )
        pg, clipped = surrogates.get(spec.pg_loss)(tokens, **dict(spec.pg_loss_params))
        mw, _ = _mask_and_weight("pg", spec.pg_mask, spec.pg_weight, stats, sums, scale, spec.pg_mask_mean)
        parts["pg"] = (scale * pg if mw is None else scale * mw * pg).sum()
        sums["clip_fraction"] = float(clipped.sum())

    for term in spec.terms:
        target_logprobs = inputs.stored_logprobs if term.estimator == "stored" else sampled.get(term.name)
        term_stats = dataclasses.replace(stats, target_logprobs=target_logprobs)
        prompt_weights = _prompt_weights(term, inputs, scale)
        mw, factor = _mask_and_weight(
            term.name,
            term.mask,
            term.weight,
            term_stats,
            sums,
            scale,
            term.mask_mean,
            0.0 if prompt_weights is None else float(prompt_weights.sum()),
        )
        token_weights = scale if mw is None else scale * mw
        if term.placement != "loss":  # in the return or the token advantages: logged here, no gradient
            value = divergences.get_estimator(term.estimator)(logprobs.detach(), _read(term, target_logprobs))
        elif term.estimator == "exact":
            value = _exact(term, inputs, models, token_weights.detach())
        elif term.estimator == "stored":
            value = stored_estimate(term.divergence, term.kwargs, logprobs, _read(term, target_logprobs))
        elif term.estimator == "sequence":
            value = sequence_chi2(logprobs, _read(term, target_logprobs), inputs.rows, len(inputs.advantages))
        else:  # a sampled estimator, importance-weighted by the detached πθ/πold
            ratio = torch.exp(logprobs.detach() - old)
            value = ratio * divergences.get_estimator(term.estimator)(logprobs, _read(term, target_logprobs))
        if mw is not None:  # a token weighted 0 contributes 0, even where D is +inf (disjoint support)
            value = torch.where(mw > 0, value, 0.0)
        sums[term.name] += float(value.detach().sum())
        if term.placement == "loss" and term.coef:
            parts[term.name] = term.coef * (token_weights * _wide(value)).sum()
            if prompt_weights is not None:  # the prompt's positions: never masked, same factor
                assert inputs.prompt is not None  # _prompt_weights is None without it
                parts[term.name] = parts[term.name] + term.coef * _at_prompt(
                    term, inputs.prompt, prompt_weights * factor
                )

    if spec.td_regularizer is not None:  # IRL imitation: λ·Σ_t a_t (z_y − γ·V(s_{t+1}))²
        td = spec.td_regularizer
        residual = td_residual(_wide(sampled_logits), _wide(lse), inputs.rows, td.gamma)
        squared = residual.square()
        sums["td_squared"] += float(squared.detach().sum())  # mean (Q − γV′)²
        sums["td_reward"] += float(residual.detach().sum())  # mean implied reward Q − γV′
        sums["soft_value"] += float(lse.detach().sum())  # mean V(s) = logsumexp of the logits
        if td.coef:
            parts["td"] = td.coef * (scale * squared).sum()

    if spec.entropy_anchor is not None:
        part, mean_entropy, kept = entropy_anchor(spec.entropy_anchor, inputs)
        parts["entropy_anchor"] = part
        sums["top_p_entropy"] += mean_entropy * len(inputs.tokens)  # per micro-batch, token-weighted
        sums["entropy_anchor_kept_fraction"] += kept * len(inputs.tokens)

    if "reference" in inputs.models and not any(_logs_kl(t) for t in spec.terms):
        # a masked or weighted reverse-KL term logs its own masked value; the `kl` metric apart
        key = "kl" if any(t.name == KL_TERM for t in spec.terms) else KL_TERM
        if stats.reference_kl is not None:  # the `kl` metric: computed already for a mask
            sums[key] += float(stats.reference_kl.sum())
        elif inputs.monitor_kl:
            with torch.no_grad():  # the `kl` metric: exact reverse KL to the reference, no graph
                ref = inputs.models["reference"]
                sums[key] += float(
                    chunked.divergence(
                        "reverse_kl", policy.hidden.detach(), policy.head.detach(), ref.hidden, ref.head
                    ).sum()
                )
    # sum() starts from the int 0, so its type is Tensor | int; with parts it is a Tensor
    loss = cast(torch.Tensor, sum(parts.values())) if parts else logprobs.sum() * 0.0
    loss_parts = {k: float(v.detach()) for k, v in parts.items()}
    _raise_on_nan(loss_parts, sums, logprobs)
    return ObjectiveOutput(loss, dict(sums), loss_parts, logprobs.detach())


KL_TERM = "reverse_kl_to_reference"  # a reverse-KL-to-reference term's metric: the `kl` metric's source


def _logs_kl(term: TermSpec) -> bool:
    """Whether the term's metric is the mean reverse KL to the reference over all tokens (unmasked)."""
    return term.name == KL_TERM and not term.mask and not term.weight


class NaNObjectiveError(ValueError):
    """The objective came out NaN: its inputs held NaN (see `_raise_on_nan`)."""


def _raise_on_nan(loss_parts: dict[str, float], sums: dict[str, float], logprobs: torch.Tensor) -> None:
    """NaNObjectiveError naming the NaN loss parts and metrics. Divergences and targets never turn
    finite or −inf log-probs into NaN (a divergence is finite or +inf), so a NaN here came in with
    the model outputs. A caller of the objective gets the error; the trainer skips the step on it,
    as on a +inf loss (`divrl.trainer.nonfinite_reason`)."""
    nan = sorted(name for name, value in {**sums, **loss_parts}.items() if math.isnan(value))
    if not nan:
        return
    tokens = torch.nonzero(logprobs.detach().isnan()).flatten().tolist()
    where = (
        f"the policy's log-prob is NaN at tokens {tokens[:10]}"
        if tokens
        else "the policy's log-probs are not: a reference, teacher, old or stored input is"
    )
    raise NaNObjectiveError(
        f"objective: NaN in {', '.join(nan)} ({where}); the inputs hold NaN (hidden states, a head's "
        f"weights, old or stored log-probs): check the models for an overflow (e.g. float16 logits) "
        f"or a diverged update"
    )


@torch.no_grad()
def token_reward(
    spec: ObjectiveSpec, target_logprobs: dict[str, torch.Tensor], behaviour: torch.Tensor
) -> torch.Tensor | float:
    """−Σ_k c_k·k1(y_t) (N,) of the token_reward terms at the behaviour policy, from each term's
    log q(y_t) (`target_logprobs` by term name): a dense per-token reward added to token t's
    advantage alone — no baseline, no return-to-go (discount 0), as in on-policy distillation with
    the reverse-KL log-ratio as reward (Thinking Machines 2025, "On-Policy Distillation"). 0 when
    there is none."""
    if not spec.token_reward_terms:
        return 0.0
    total = torch.zeros_like(behaviour)
    for term in spec.token_reward_terms:
        estimate = divergences.get_estimator(term.estimator)(behaviour, target_logprobs[term.name])
        total = total - term.coef * estimate.to(total.dtype)
    return total


@torch.no_grad()
def reward_penalty(spec: ObjectiveSpec, inputs: ObjectiveInputs) -> torch.Tensor:
    """P_i = Σ_k c_k Σ_{t∈i} k(y_t) (B,) of the reward-placed terms, at the behaviour policy."""
    penalty = torch.zeros(len(inputs.advantages), device=inputs.advantages.device)
    if not spec.reward_terms:
        return penalty
    models = _models(inputs)
    behaviour = inputs.old_logprobs
    if behaviour is None:
        behaviour = _model_logprobs(inputs.policy, inputs.tokens)
    for term in spec.reward_terms:
        value = divergences.get_estimator(term.estimator)(behaviour, _sampled_target_logprobs(term, inputs, models))
        penalty.index_add_(0, inputs.rows, term.coef * value.to(penalty.dtype))
    return penalty


def models_read_at_tokens(spec: ObjectiveSpec) -> frozenset[str]:
    """The models whose log-probs of the sampled tokens sampled-estimator terms read, and the
    reference when a mask or weight reads it: a trainer computes them once per batch
    (`ModelOutputs.token_logprobs`, `token_entropy`), not once per loss evaluation."""
    return (
        frozenset(t.target.op for t in spec.terms if t.estimator not in ("exact", "stored") and t.target.is_model)
        | ({"reference"} if spec.reads_reference else set())
        | ({"teacher"} if spec.policy_gradient and spec.pg_loss in surrogates.READS_TEACHER else set())
    )


def online_and_stored(spec: ObjectiveSpec) -> tuple[ObjectiveSpec, ObjectiveSpec | None]:
    """The objective of the online batch (everything but stored terms) and that of the stored
    responses (their terms alone, no policy gradient), None when there is no stored term."""
    online = dataclasses.replace(spec, terms=tuple(t for t in spec.terms if t.estimator != "stored"))
    if not spec.stored_terms:
        return online, None
    return online, dataclasses.replace(
        spec,
        policy_gradient=False,
        terms=spec.stored_terms,
        entropy_anchor=None,
        td_regularizer=None,
        pg_mask=(),
        pg_weight=(),
    )


def summarize(sources: list[tuple[dict[str, float], dict[str, float], int]], passes: int = 1) -> dict[str, float]:
    """Metrics of one update from (token sums, loss parts, token count) per batch it trained on
    (the online batch, and the stored responses if any), summed over `passes` inner iterations.

    Per-token means of every quantity, each over its own batch's tokens (``<divergence>_to_<target>``
    for each term, ``kl`` = the reverse KL to the reference over all tokens, ``entropy``,
    ``clip_fraction``; a stored batch's quantity named as an online one's gets ``_stored``, e.g.
    ``entropy_stored``), each loss part as ``<name>_loss`` (``pg_loss`` for the policy gradient)
    and its share |part| / Σ|parts| as ``<name>_share``; ``loss`` is their sum.
    """
    metrics: dict[str, float] = {}
    parts: dict[str, float] = {}
    for token_sums, loss_parts, n_tokens in sources:
        for key, value in token_sums.items():  # a later batch's metric of the same name: <name>_stored
            metrics[f"{key}_stored" if key in metrics else key] = value / (max(n_tokens, 1) * passes)
        parts.update({k: v / passes for k, v in loss_parts.items()})
    if KL_TERM in metrics and "kl" not in metrics:
        metrics["kl"] = metrics[KL_TERM]
    for key in [k for k in metrics if k.endswith("_failed_weight_sum")]:  # ResRL: mean over failed tokens
        name = key.removesuffix("_failed_weight_sum")
        total, count = metrics.pop(key), metrics.pop(f"{name}_failed_tokens")
        metrics[f"{name}_failed_mean_weight"] = total / count if count else math.nan
    total_abs = sum(abs(v) for v in parts.values())
    for name, value in parts.items():
        metrics[f"{name}_loss"] = value
        metrics[f"{name}_share"] = abs(value) / total_abs if total_abs else 0.0
    metrics["loss"] = sum(parts.values())
    return metrics
