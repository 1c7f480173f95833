"""Exact divergences to every target kind — the fused tiles for a model target, the row-chunk
path for any expression — equal the full-logit computation in float64 (values and gradients),
for every divergence, with zero-probability tokens and disjoint supports."""

import math

import pytest
import torch

from divergence_cases import POINTWISE_CASES
from divrl import divergences
from divrl.chunked import Head
from divrl.objectives import ObjectiveInputs
from divrl.rowwise import ModelOutputs
from divrl.spec import parse_objective, parse_target

N, V, H = 6, 9, 4
TARGETS = {
    "reference": "reference",
    "teacher": "teacher",
    "self": "self",
    "old": "old",
    "tilt": {"tilt": {"base": "old", "beta": 0.5}},
    "extrapolate": {"extrapolate": {"ref": "reference", "teacher": "teacher", "lam": 1.5}},
    "mix": {"mix": {"a": "reference", "b": "teacher", "alpha": 0.3}},
    "filter": {"filter": {"p": "self", "min_p": 0.1}},
    "temperature": {"temperature": {"p": "teacher", "T": 2.0}},
    "reward_power": {"reward_power": {"p": "reference", "floor": 0.3}},
    "uniform": {"uniform": {"p": "teacher"}},
    "sampled_token": {"mix": {"a": {"sampled_token": {}}, "b": "teacher", "alpha": 0.4}},  # PS-KD's target
}
REWARDS = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.25], dtype=torch.float64)  # reward_power's, per token
SUPPORTS = {  # −inf bias entries: tokens the model gives zero mass
    "full": ((), ()),
    "zeros": ((0, 1), (1, 5)),
    "disjoint": ((0, 1, 2, 3), (4, 5, 6, 7, 8)),
}


def _head(gen, hidden_size, zero_tokens):
    bias = torch.randn(V, dtype=torch.float64, generator=gen)
    bias[list(zero_tokens)] = -math.inf
    return Head(torch.randn(V, hidden_size, dtype=torch.float64, generator=gen), bias=bias)


def _problem(support):
    gen = torch.Generator().manual_seed(0)
    policy_hidden = torch.randn(N, H, dtype=torch.float64, generator=gen).requires_grad_()
    policy_head = Head(
        torch.randn(V, H, dtype=torch.float64, generator=gen).requires_grad_(),
        bias=torch.randn(V, dtype=torch.float64, generator=gen),
        scale=1.3,
        temperature=0.8,
    )
    ref_zeros, teacher_zeros = SUPPORTS[support]
    models = {
        "reference": ModelOutputs(torch.randn(N, H, dtype=torch.float64, generator=gen), _head(gen, H, ref_zeros)),
        "teacher": ModelOutputs(torch.randn(N, 3, dtype=torch.float64, generator=gen), _head(gen, 3, teacher_zeros)),
    }
    tokens = torch.randint(0, V, (N,), generator=gen)
    advantages = torch.randn(N, dtype=torch.float64, generator=gen)
    return policy_hidden, policy_head, models, tokens, advantages


def _full_divergence(name, params, target_spec, policy_hidden, policy_head, models, tokens, advantages):
    """The same quantity from full (N, V) logits and the pure functions, no chunking."""
    logp = policy_head.logits(policy_hidden).log_softmax(-1)
    logprobs = {k: m.head.logits(m.hidden).log_softmax(-1) for k, m in models.items()}
    logprobs["self"] = logprobs["old"] = logp.detach()
    advantage = torch.zeros(N, V, dtype=torch.float64).scatter(-1, tokens[:, None], advantages[:, None])
    target = parse_target(target_spec, "target")
    token = torch.zeros(N, V, dtype=torch.bool).scatter(-1, tokens[:, None], True)
    return divergences.get(name)(logp, target.evaluate(logprobs, advantage, REWARDS[:, None], token).detach(), **params)


def _objective_divergence(name, params, target_spec, policy_hidden, policy_head, models, tokens, advantages):
    spec = parse_objective(
        {
            "policy_gradient": False,
            "teacher": "t",
            "terms": [{"divergence": name, "params": params, "target": target_spec, "coef": 1.0}],
        }
    )
    inputs = ObjectiveInputs(
        policy=ModelOutputs(policy_hidden, policy_head),
        tokens=tokens,
        rows=torch.arange(N),
        advantages=advantages,
        rewards=REWARDS,
        group_pass_rate=torch.zeros(N),
        token_scale=torch.ones(N, dtype=torch.float64),
        models=models,
    )
    from divrl import objectives

    term = spec.terms[0]
    return objectives._exact(term, inputs, objectives._models(inputs), None)


@pytest.mark.parametrize("support", sorted(SUPPORTS))
@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("name,params", POINTWISE_CASES, ids=[f"{n}{p}" for n, p in POINTWISE_CASES])
def test_exact_divergence_to_any_target_equals_full_logits(name, params, target, support):
    problem = _problem(support)
    policy_hidden, policy_head = problem[:2]
    weights = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    got = _objective_divergence(name, params, TARGETS[target], *problem)
    expected = _full_divergence(name, params, TARGETS[target], *problem)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    finite = expected.isfinite()
    if not finite.any():
        return
    params_to_check = (policy_hidden, policy_head.weight)
    grads = [
        torch.autograd.grad((weights * v)[finite].sum(), params_to_check)
        for v in (
            _objective_divergence(name, params, TARGETS[target], *problem),
            _full_divergence(name, params, TARGETS[target], *problem),
        )
    ]
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("target", ["reference", "extrapolate", "filter"])
def test_sinkhorn_topk_through_the_row_path_equals_full_logits(target):
    problem = _problem("full")
    params = {
        "cost": torch.rand(V, V, dtype=torch.float64, generator=torch.Generator().manual_seed(3)),
        "k": 3,
        "epsilon": 0.5,
        "iterations": 50,
    }
    got = _objective_divergence("sinkhorn_topk", params, TARGETS[target], *problem)
    expected = _full_divergence("sinkhorn_topk", params, TARGETS[target], *problem)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    grads = [torch.autograd.grad(v.sum(), problem[0]) for v in (got, expected)]
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-9)


def test_row_path_keeps_only_one_chunk_of_vocabulary_tensors_alive():
    """With chunk_rows = 2 no saved tensor of the backward graph is (N, V) or larger."""
    from divrl import rowwise

    policy_hidden, policy_head, models, tokens, advantages = _problem("full")
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    target = parse_target(TARGETS["extrapolate"], "target")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = rowwise.divergence_to_target(
            divergences.get("forward_kl"),
            target,
            ModelOutputs(policy_hidden, policy_head),
            models,
            tokens,
            advantages,
            chunk_rows=2,
        )
    assert value.shape == (N,)
    assert max(saved) < N * V, "a full (N, V) tensor was kept for backward"
