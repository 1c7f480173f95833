"""The parts of the benchmark scripts that run without their peers (TRL is only in the `bench`
extra): a benchmark whose TRL side scores with a stale API fails only when someone runs it."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from divrl.tasks import build_task


def benchmark(name: str):
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpo_step_trl_side_scores_with_divrls_verifier():
    grpo_step = benchmark("grpo_step")
    rows, reward = grpo_step.trl_task(1)
    train = build_task(grpo_step.divrl_config(1, "float32", "unused")).train
    assert [r["prompt"][0]["content"] for r in rows[:3]] == [e.prompt for e in train[:3]]
    right, wrong = train[1].answer, str(int(train[1].answer) + 1)
    completions = [[{"role": "assistant", "content": f"So the answer is {a}."}] for a in (right, wrong)]
    assert reward(completions=completions, index=[1, 1]) == [1.0, 0.0]


def test_grpo_step_memory_floor_counts_weights_reference_gradients_and_adamw(tiny):
    model, _ = tiny
    reference = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied tensor once
    steps = len(optimizer.state) * 4  # AdamW's per-parameter step counter, a float32 scalar
    held = benchmark("grpo_step").held_state_gb([model, reference], optimizer)
    # policy + reference + two moments + gradients
    assert held * 1e9 == pytest.approx(5 * weights + steps, rel=1e-9)
