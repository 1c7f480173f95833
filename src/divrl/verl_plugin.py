"""divrl's sampled-token objectives inside verl (``pip install 'divrl[verl]'``, verl 0.9).

verl imports every entry point of group ``verl.plugins`` when it is imported, in the driver and in
each Ray worker (``ep.load()``: imports the module, calls nothing), so importing this module, when
verl is installed, registers:

- policy losses ``divrl_<surrogate>`` (``actor.policy_loss.loss_mode=divrl_clipped``) for the
  `divrl.surrogates` that read only per-token log-probs and advantages: ``clipped``
  −min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A), ρ = πθ/πold, with ε from the actor's
  ``clip_ratio_low``/``clip_ratio_high`` (each defaulting to ``clip_ratio``, as verl's ``vanilla``);
  ``reinforce`` −A·log πθ; ``gdsd`` (ψ = 10, ε = 0.2). The per-token loss is multiplied by verl's
  ``rollout_is_weights`` when given and aggregated by verl's ``agg_loss`` (its ``loss_agg_mode``
  and the actor's ``global_batch_info``), which for one rank equals divrl's ``token_scale``:
  token-mean 1/Σ_i L_i, seq-mean-token-mean 1/(B·L_i), seq-mean-token-sum 1/B,
  seq-mean-token-sum-norm 1/(B·loss_scale_factor).
- advantage estimators ``divrl_<name>`` (``algorithm.adv_estimator=divrl_group_norm``,
  `ADVANTAGE_ESTIMATORS`): divrl's ``objectives.advantages`` per group of equal ``uid`` (a group of
  one sample gets 0, except ``signed``), times a `divrl.weights` policy-gradient weight of the
  token. A weight w ≥ 0 folded into the advantage gives the same loss as divrl's w·ℓ_PG for every
  surrogate positively homogeneous in A (``clipped``, ``reinforce``, verl's ``vanilla`` with its
  dual clip): −min(ρ·wA, clip(ρ)·wA) = w·(−min(ρA, clip(ρ)A)).

Read in verl 0.9.1 (the PyPI wheel verl-0.9.1-py3-none-any.whl, sha256 db6e6f2a…bfdd14):
``verl/__init__.py`` (plugin discovery), ``verl/trainer/ppo/core_algos.py`` (``PolicyLossFn``,
``register_policy_loss``, ``register_adv_est``, ``agg_loss``, ``compute_policy_loss_vanilla``),
``verl/workers/utils/losses.py::ppo_loss`` (calls the policy loss with keywords, metrics as floats)
and ``verl/trainer/ppo/ray_trainer.py::compute_advantage`` (calls an estimator with the keywords
token_level_rewards, response_mask, config, index = the ``uid`` array and, when present,
reward_baselines; expects (advantages, returns), both (B, T)).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from divrl import objectives, surrogates, weights
from divrl.spec import ObjectiveSpec

POLICY_LOSSES = ("clipped", "reinforce", "gdsd")

# name → the advantage and pg_weight of a divrl config (the recipes of the same name).
ADVANTAGE_ESTIMATORS: dict[str, ObjectiveSpec] = {
    "group_norm": ObjectiveSpec(),  # GRPO: (r − mean)/(sample std + 1e-6)
    "group_norm_population": ObjectiveSpec(advantage_std="population"),
    "mean_only": ObjectiveSpec(advantage="mean_only"),  # Dr. GRPO
    "signed": ObjectiveSpec(advantage="signed"),  # ±1 by pass, no baseline
    "reasonmaxxer": ObjectiveSpec(advantage_std="population", advantage_clip=2.5),
    "paced": ObjectiveSpec(pg_weight=(("pass_rate", {"a": 1.0, "b": 1.0}),)),
    "psr": ObjectiveSpec(advantage="signed", pg_weight=(("asymmetric", {"positive": 1.0, "negative": 0.0}),)),
    "nsr": ObjectiveSpec(advantage="signed", pg_weight=(("asymmetric", {"positive": 0.0, "negative": 1.0}),)),
    "w_reinforce": ObjectiveSpec(advantage="signed", pg_weight=(("asymmetric", {"positive": 0.1, "negative": 1.0}),)),
    "stcr": ObjectiveSpec(pg_weight=(("stcr", {}),)),  # APO's weight on long failures
}


def token_losses(
    name: str, old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor, **params: Any
) -> tuple[Tensor, Tensor]:
    """(ℓ_PG, clipped) of divrl surrogate ``name`` on verl's (B, T) tensors, 0 outside the mask.

    Each completion is a row; the surrogates here read neither pass verdicts nor a teacher, so
    ``PolicyTokens.passed`` and ``group_pass_rate`` are given as zeros.
    """
    mask = response_mask.bool()
    logprobs = log_prob[mask]
    tokens = surrogates.PolicyTokens(
        logprobs,
        old_log_prob[mask],
        advantages[mask],
        torch.zeros_like(logprobs, dtype=torch.bool),
        torch.zeros_like(logprobs),
        mask.nonzero()[:, 0],
    )
    loss, clipped = surrogates.get(name)(tokens, **params)
    return loss.new_zeros(mask.shape).masked_scatter(mask, loss), mask.new_zeros(mask.shape).masked_scatter(
        mask, clipped
    )


def _surrogate_params(name: str, config: Any) -> dict[str, float]:
    """``clipped``'s ε_low/ε_high from the actor config as verl's ``vanilla`` reads them; else divrl's defaults."""
    if name != "clipped" or config is None:
        return {}
    clip = config.get("clip_ratio", 0.2)
    low, high = config.get("clip_ratio_low"), config.get("clip_ratio_high")
    return {"clip_low": clip if low is None else low, "clip_high": clip if high is None else high}


def _policy_loss(name: str) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    def policy_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        from verl.trainer.ppo.core_algos import agg_loss

        loss_mat, clipped = token_losses(
            name, old_log_prob, log_prob, advantages, response_mask, **_surrogate_params(name, config)
        )
        if rollout_is_weights is not None:
            loss_mat = loss_mat * rollout_is_weights
        batch_info = {} if config is None else dict(config.get("global_batch_info") or {})
        pg_loss = agg_loss(loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
        mask = response_mask.bool()
        count = max(int(mask.sum()), 1)
        metrics = {
            "actor/pg_clipfrac": float(clipped.sum()) / count,
            "actor/ppo_kl": float((old_log_prob - log_prob).detach()[mask].sum()) / count,
        }
        return pg_loss, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = f"divrl_{name}"
    policy_loss.__doc__ = f"verl policy loss: divrl surrogate {name!r} per token, aggregated by verl's agg_loss."
    return policy_loss


def token_advantages(spec: ObjectiveSpec, token_level_rewards: Tensor, response_mask: Tensor, index: Any) -> Tensor:
    """(B, T) advantages: A_i of ``objectives.advantages(spec, …)`` within each ``index`` group
    (r_i = Σ_t token_level_rewards; 0 for a group of one sample unless ``signed``), times the
    product of ``spec.pg_weight`` at each token, 0 outside ``response_mask``."""
    rewards = token_level_rewards.sum(-1)
    _, inverse = np.unique(np.asarray(index), return_inverse=True)
    groups = torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=rewards.device)
    passed = objectives.passed(rewards)
    advantage = torch.zeros_like(rewards, dtype=torch.promote_types(rewards.dtype, torch.float32))
    for group in range(int(groups.max()) + 1 if len(groups) else 0):
        members = (groups == group).nonzero()[:, 0]
        if len(members) > 1 or spec.advantage == "signed":
            advantage[members] = objectives.advantages(spec, rewards[members], None, len(members)).to(advantage.dtype)
    counts = torch.bincount(groups).to(advantage.dtype)
    pass_rate = torch.bincount(groups, weights=passed.to(advantage.dtype)).to(advantage.dtype) / counts
    mask = response_mask.bool()
    rows = mask.nonzero()[:, 0]
    stats = weights.TokenStats(
        rows=rows,
        advantages=advantage,
        rewards=rewards,
        group_pass_rate=pass_rate[groups],
        passed=passed,
        groups=groups,
    )
    per_token = advantage[rows] * weights.compute(spec.pg_weight, stats)
    return per_token.new_zeros(mask.shape).masked_scatter(mask, per_token)


def reads_verdict(spec: ObjectiveSpec) -> bool:
    """Whether the estimator reads each sample's pass verdict (reward ≥ PASS_THRESHOLD): the signed
    advantage, or a weight of the pass rate or of failures."""
    return spec.advantage == "signed" or any(name in ("pass_rate", "stcr") for name, _ in spec.pg_weight)


def _advantage_estimator(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    spec = ADVANTAGE_ESTIMATORS[name]

    def advantage_estimator(
        token_level_rewards: Tensor, response_mask: Tensor, index: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        # kwargs: what else verl passes (config: its algorithm config, reward_baselines)
        if reads_verdict(spec) and getattr(kwargs.get("config"), "use_kl_in_reward", False):
            raise ValueError(
                f"divrl_{name} reads each sample's pass verdict from its reward, which "
                f"algorithm.use_kl_in_reward lowers by the KL penalty (every pass would read as a "
                f"failure); put the KL in the loss (actor_rollout_ref.actor.use_kl_loss) instead"
            )
        with torch.no_grad():
            advantages = token_advantages(spec, token_level_rewards, response_mask, index)
        return advantages, advantages

    advantage_estimator.__name__ = advantage_estimator.__qualname__ = f"divrl_{name}"
    advantage_estimator.__doc__ = f"verl advantage estimator: divrl's {name!r} advantage (see `token_advantages`)."
    return advantage_estimator


POLICY_LOSS_FNS = {f"divrl_{name}": _policy_loss(name) for name in POLICY_LOSSES}
ADVANTAGE_ESTIMATOR_FNS = {f"divrl_{name}": _advantage_estimator(name) for name in ADVANTAGE_ESTIMATORS}


def register() -> None:
    """Register every ``divrl_*`` policy loss and advantage estimator with verl (idempotent)."""
    from verl.trainer.ppo import core_algos

    for name, fn in POLICY_LOSS_FNS.items():
        core_algos.register_policy_loss(name)(fn)
    for name, estimator in ADVANTAGE_ESTIMATOR_FNS.items():
        core_algos.register_adv_est(name)(estimator)


if importlib.util.find_spec("verl") is not None:  # loaded as verl's plugin, or imported beside verl
    register()
