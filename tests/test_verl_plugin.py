"""divrl.verl_plugin: the verl policy losses and advantage estimators equal divrl's own objective.

Where verl imports, every function is called through verl's registries (``get_policy_loss_fn``,
``get_adv_estimator_fn``) and the loss is aggregated by verl's ``agg_loss``. This project's
environment has no verl: verl 0.9.1 requires transformers < 5.11 and divrl runs 5.24, so it was
checked in a separate virtual environment (verl 0.9.1 installed with --no-deps beside this one's
packages, plus ray, tensordict, omegaconf, hydra-core). Without verl the signatures are pinned to
those read in the verl 0.9.1 wheel (PyPI verl-0.9.1-py3-none-any.whl, sha256
db6e6f2a8d9d5808d9ec32d357a42319fdc6967df688ff9d9810050f49bfdd14; verl/trainer/ppo/core_algos.py:
``compute_policy_loss_vanilla`` and the ``PolicyLossFn`` alias; verl/trainer/ppo/ray_trainer.py:
``compute_advantage``), and the loss is aggregated by divrl's ``token_scale`` (equal to ``agg_loss``
on one rank).
"""

from __future__ import annotations

import dataclasses
import inspect
from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from divrl import chunked, divergences, objectives, recipes, verl_plugin, weights
from divrl.chunked import Head
from divrl.rowwise import ModelOutputs
from divrl.spec import parse_objective

try:
    from verl.trainer.ppo import core_algos
except ImportError:
    core_algos = None

needs_verl = pytest.mark.skipif(core_algos is None, reason="verl is not installed")

P, G, T, V, H = 3, 4, 6, 11, 5
# float64 throughout: the folded weight w·A is then exact enough to compare at 1e-12 (float32 rounds it).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
LENGTHS = [3, 6, 1, 4, 5, 2, 6, 3, 4, 6, 2, 5]
PERMUTATION = torch.tensor([5, 0, 11, 3, 8, 1, 10, 4, 2, 7, 9, 6])  # verl's batch need not be group-major


def _mask() -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]


def _padded(flat: torch.Tensor) -> torch.Tensor:
    """Flat completion tokens (group-major) → verl's (B, T) rows, permuted."""
    return flat.new_zeros(_mask().shape).masked_scatter(_mask(), flat)[PERMUTATION]


def _verl_inputs() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """token_level_rewards (the reward on the last token), response_mask and the uid array, permuted."""
    rows = torch.arange(len(LENGTHS))
    token_level_rewards = torch.zeros(len(LENGTHS), T, dtype=torch.float64)
    token_level_rewards[rows, torch.tensor(LENGTHS) - 1] = REWARDS
    uids = np.array([f"prompt-{i // G}" for i in range(len(LENGTHS))], dtype=object)
    return token_level_rewards[PERMUTATION], _mask()[PERMUTATION].float(), uids[PERMUTATION.numpy()]


def _advantage_estimator(name: str):
    return verl_plugin.ADVANTAGE_ESTIMATOR_FNS[name] if core_algos is None else core_algos.get_adv_estimator_fn(name)


def _divrl_stats(spec) -> weights.TokenStats:
    passed = objectives.passed(REWARDS)
    return weights.TokenStats(
        rows=torch.arange(len(LENGTHS)).repeat_interleave(torch.tensor(LENGTHS)),
        advantages=objectives.advantages(spec, REWARDS, None, G),
        rewards=REWARDS,
        group_pass_rate=objectives.group_pass_rate(passed, G),
        passed=passed,
        groups=torch.arange(P).repeat_interleave(G),
    )


@pytest.mark.parametrize("name", sorted(verl_plugin.ADVANTAGE_ESTIMATORS))
def test_advantage_estimators_equal_divrl_advantages_times_the_pg_weight(name):
    spec = verl_plugin.ADVANTAGE_ESTIMATORS[name]
    stats = _divrl_stats(spec)
    expected = stats.advantages[stats.rows] * weights.compute(spec.pg_weight, stats)
    token_level_rewards, response_mask, uids = _verl_inputs()
    advantages, returns = _advantage_estimator(f"divrl_{name}")(
        token_level_rewards=token_level_rewards, response_mask=response_mask, config=None, index=uids
    )
    torch.testing.assert_close(advantages, _padded(expected))
    assert returns is advantages


def test_a_group_of_one_sample_gets_zero_unless_signed():
    rewards, mask, uids = torch.tensor([[1.0], [0.0]]), torch.ones(2, 1), np.array(["a", "b"], dtype=object)
    group_norm = verl_plugin.ADVANTAGE_ESTIMATOR_FNS["divrl_group_norm"](rewards, mask, uids)[0]
    signed = verl_plugin.ADVANTAGE_ESTIMATOR_FNS["divrl_signed"](rewards, mask, uids)[0]
    assert group_norm.tolist() == [[0.0], [0.0]] and signed.tolist() == [[1.0], [-1.0]]


@pytest.mark.parametrize(
    "name, recipe",
    [
        ("group_norm", "grpo"),
        ("mean_only", "dr-grpo"),
        ("reasonmaxxer", "reasonmaxxer"),
        ("paced", "paced"),
        ("psr", "psr"),
        ("nsr", "nsr"),
        ("w_reinforce", "w-reinforce"),
        ("stcr", "apo"),
    ],
)
def test_advantage_estimators_are_the_recipes_advantages(name, recipe):
    spec, ours = parse_objective(recipes.load(recipe).config), verl_plugin.ADVANTAGE_ESTIMATORS[name]
    fields = ("advantage", "advantage_std", "advantage_clip", "pg_weight")
    assert [getattr(ours, f) for f in fields] == [getattr(spec, f) for f in fields]


# (surrogate, advantage estimator): the estimator's weight folds into A for the homogeneous surrogates.
CASES = [("clipped", "paced"), ("clipped", "stcr"), ("reinforce", "w_reinforce"), ("gdsd", "mean_only")]
AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("surrogate, estimator", CASES)
def test_policy_loss_with_divrl_advantages_equals_divrl_objective(surrogate, estimator, aggregation):
    gen = torch.Generator().manual_seed(1)
    n = sum(LENGTHS)
    hidden = torch.randn(n, H, generator=gen, dtype=torch.float64).requires_grad_()
    head = Head(torch.randn(V, H, generator=gen, dtype=torch.float64))
    tokens = torch.randint(0, V, (n,), generator=gen)
    old = chunked.logprob_entropy(hidden.detach(), head, tokens)[0] + 0.3 * torch.randn(n, generator=gen)
    spec = dataclasses.replace(
        verl_plugin.ADVANTAGE_ESTIMATORS[estimator],
        pg_loss=surrogate,
        clip_low=0.2,
        clip_high=0.28,
        aggregation=aggregation,
        normalizer=8.0,
    )
    stats = _divrl_stats(spec)
    divrl_out = objectives.objective_loss(
        spec,
        objectives.ObjectiveInputs(
            policy=ModelOutputs(hidden, head),
            tokens=tokens,
            rows=stats.rows,
            advantages=stats.advantages,
            rewards=REWARDS,
            group_pass_rate=stats.group_pass_rate,
            token_scale=objectives.token_scale(spec, LENGTHS).double(),
            old_logprobs=old,
            groups=stats.groups,
        ),
    )
    (divrl_grad,) = torch.autograd.grad(divrl_out.loss, hidden)

    token_level_rewards, response_mask, uids = _verl_inputs()
    advantages, _ = _advantage_estimator(f"divrl_{estimator}")(
        token_level_rewards=token_level_rewards, response_mask=response_mask, config=None, index=uids
    )
    log_prob = _padded(chunked.logprob_entropy(hidden, head, tokens)[0])
    config = {
        "clip_ratio": 0.2,
        "clip_ratio_low": 0.2,
        "clip_ratio_high": 0.28,
        "global_batch_info": {
            "dp_size": 1,
            "batch_num_tokens": n,
            "global_batch_size": len(LENGTHS),
            "loss_scale_factor": 8,
        },
    }
    if core_algos is None:  # verl's agg_loss on one rank is divrl's token_scale
        loss_mat, clipped = verl_plugin.token_losses(
            surrogate,
            _padded(old),
            log_prob,
            advantages,
            response_mask,
            **verl_plugin._surrogate_params(surrogate, config),
        )
        loss = (loss_mat * _padded(objectives.token_scale(spec, LENGTHS).double())).sum()
        clip_fraction = float(clipped.sum()) / n
    else:
        loss, metrics = core_algos.get_policy_loss_fn(f"divrl_{surrogate}")(
            old_log_prob=_padded(old),
            log_prob=log_prob,
            advantages=advantages,
            response_mask=response_mask.bool(),
            loss_agg_mode=aggregation.replace("_", "-"),
            config=config,
            rollout_is_weights=None,
        )
        clip_fraction = metrics["actor/pg_clipfrac"]
    (grad,) = torch.autograd.grad(loss, hidden)
    # divrl's token_scale a_t is float32 (as the trainer uses it); agg_loss divides in float64.
    assert loss.item() == pytest.approx(divrl_out.loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, divrl_grad, rtol=1e-6, atol=1e-12)
    assert clip_fraction == pytest.approx(divrl_out.token_sums["clip_fraction"] / n)


POLICY_LOSS_SIGNATURE = [  # verl 0.9.1 core_algos.compute_policy_loss_vanilla: (name, default)
    ("old_log_prob", inspect.Parameter.empty),
    ("log_prob", inspect.Parameter.empty),
    ("advantages", inspect.Parameter.empty),
    ("response_mask", inspect.Parameter.empty),
    ("loss_agg_mode", "token-mean"),
    ("config", None),
    ("rollout_is_weights", None),
]


def _names_and_defaults(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_verdict_reading_estimators_refuse_a_reward_with_verls_kl_penalty():
    """With algorithm.use_kl_in_reward verl passes r − β·KL per token: a pass of reward 1 sums below
    the pass threshold, so the estimators that read verdicts refuse it; the others take it."""
    rewards, mask = torch.tensor([[0.0, 0.99], [0.0, -0.01]]), torch.ones(2, 2)
    kl_in_reward = SimpleNamespace(use_kl_in_reward=True)
    reading = {name for name, spec in verl_plugin.ADVANTAGE_ESTIMATORS.items() if verl_plugin.reads_verdict(spec)}
    assert reading == {"signed", "psr", "nsr", "w_reinforce", "paced", "stcr"}
    for name in reading:
        with pytest.raises(ValueError, match=f"divrl_{name} reads each sample's pass verdict"):
            verl_plugin.ADVANTAGE_ESTIMATOR_FNS[f"divrl_{name}"](rewards, mask, np.array([0, 0]), config=kl_in_reward)
    advantages, _ = verl_plugin.ADVANTAGE_ESTIMATOR_FNS["divrl_group_norm"](
        rewards, mask, np.array([0, 0]), config=kl_in_reward
    )
    assert advantages[0, 0] > 0 > advantages[1, 0]


def test_signatures_are_verls():
    for fn in verl_plugin.POLICY_LOSS_FNS.values():
        assert _names_and_defaults(fn) == POLICY_LOSS_SIGNATURE
    # ray_trainer.compute_advantage calls a registered estimator with these keywords.
    keywords = {"token_level_rewards": 0, "response_mask": 0, "config": None, "index": 0, "reward_baselines": 0}
    for fn in verl_plugin.ADVANTAGE_ESTIMATOR_FNS.values():
        inspect.signature(fn).bind(**keywords)
    if core_algos is not None:
        assert _names_and_defaults(core_algos.compute_policy_loss_vanilla) == POLICY_LOSS_SIGNATURE


def test_the_entry_point_names_the_module():
    (entry,) = [e for e in entry_points(group="verl.plugins") if e.name == "divrl"]
    assert entry.value == "divrl.verl_plugin"


@needs_verl
def test_verl_registered_everything_through_the_entry_point():
    assert {n: core_algos.get_policy_loss_fn(n) for n in verl_plugin.POLICY_LOSS_FNS} == verl_plugin.POLICY_LOSS_FNS
    assert {
        n: core_algos.get_adv_estimator_fn(n) for n in verl_plugin.ADVANTAGE_ESTIMATOR_FNS
    } == verl_plugin.ADVANTAGE_ESTIMATOR_FNS


@needs_verl
@pytest.mark.parametrize(
    "verl_type, divrl_name", [("k1", "k1"), ("k2", "k2"), ("k3", "k3"), ("k1+", "k1_st"), ("k3+", "k3_st")]
)
def test_verl_kl_loss_types_are_divrls_sampled_estimators(verl_type, divrl_name):
    """What a verl user sets instead of a sampled divrl KL term: actor.kl_loss_type (|r| < 20 here,
    inside the clamp of verl's k3)."""
    gen = torch.Generator().manual_seed(2)
    logprob = (-3 * torch.rand(64, generator=gen, dtype=torch.float64)).requires_grad_()
    ref = -3 * torch.rand(64, generator=gen, dtype=torch.float64)
    ours = divergences.get_estimator(divrl_name)(logprob, ref)
    theirs = core_algos.kl_penalty(logprob, ref, verl_type)
    torch.testing.assert_close(theirs, ours)
    torch.testing.assert_close(*(torch.autograd.grad(x.sum(), logprob)[0] for x in (theirs, ours)))
