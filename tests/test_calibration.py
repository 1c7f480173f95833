"""InfAlign's calibrate-and-transform reward (divrl.calibration) and its use in training."""

import json
import math
import re

import numpy as np
import pytest
import torch

from divrl.calibration import CalibrationSpec, calibrated, transformed
from divrl.cli import main


def test_calibrated_reward_by_hand():
    reference = [0.0, 0.0, 0.5, 1.0]  # sorted
    assert calibrated(0.5, reference) == pytest.approx((2 + 0.5) / 4)  # beats two, ties one
    assert calibrated(0.0, reference) == pytest.approx(0.5 * 2 / 4)
    assert calibrated(2.0, reference) == 1.0 and calibrated(-1.0, reference) == 0.0


def test_calibrated_reward_is_uniform_under_the_reference_without_ties():
    rng = np.random.default_rng(0)
    values = [calibrated(float(rng.normal()), sorted(rng.normal(size=64).tolist())) for _ in range(4000)]
    assert np.mean(values) == pytest.approx(0.5, abs=0.02)
    assert np.var(values) == pytest.approx(1 / 12, abs=0.01)
    assert np.histogram(values, bins=4, range=(0, 1))[0] / 4000 == pytest.approx([0.25] * 4, abs=0.03)


def test_exponential_transform_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # two prompts × two samples; C = 0.75, 0.25, 0.5, 0.5
    reference = [[0.0, 1.0], [1.0, 1.0]]
    best = [math.exp(1.5), math.exp(0.5), math.exp(1.0), math.exp(1.0)]  # exp(2C)
    assert transformed(rewards, reference, t=2.0).tolist() == pytest.approx(best)
    worst = [-math.exp(-1.5), -math.exp(-0.5), -math.exp(-1.0), -math.exp(-1.0)]  # −exp(−2C)
    assert transformed(rewards, reference, t=-2.0).tolist() == pytest.approx(worst)
    assert transformed(rewards, reference, t=0.0).tolist() == [0.75, 0.25, 0.5, 0.5]  # C itself


@pytest.mark.parametrize("t", [-3.0, 0.0, 3.0])
def test_every_transform_ranks_a_better_reward_higher(t):
    out = transformed(torch.tensor([0.0, 0.5, 1.0]), [[0.0, 0.5, 1.0]], t=t)
    assert out[0] < out[1] < out[2]


@pytest.mark.parametrize(
    "value, message",
    [
        ({"samples": 0}, "samples must be an integer ≥ 1"),
        ({"samples": True}, "samples must be an integer ≥ 1, got True"),
        ({"t": False}, "t must be a finite number, got False"),
        ({"t": math.inf}, "t must be a finite number"),
        ({"k": 3}, "unknown field(s) ['k']"),
        ([1], "must be a mapping"),
    ],
)
def test_spec_errors(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CalibrationSpec.parse(value)


def test_training_with_calibration_keeps_the_reference_rewards_in_the_checkpoint(tmp_path, say_task):
    run = tmp_path / "run"
    task = [arg for o in say_task([1, 2, 3, 4, 5, 6], "parity") for arg in ("--set", o)]
    assert (
        main(
            [
                "train",
                *task,
                "--set",
                "model=tiny",
                "--set",
                "steps=2",
                "--set",
                "prompts_per_step=2",
                "--set",
                "group_size=2",
                "--set",
                "max_new_tokens=3",
                "--set",
                "eval_samples=2",
                "--set",
                "checkpoint_every=1",
                "--set",
                "inspect_every=0",
                "--set",
                "reward_calibration={samples: 3, t: 1.5}",
                "--set",
                f"output_dir={run}",
            ]
        )
        == 0
    )
    state = json.loads((run / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    cached = state["reference_rewards"]
    assert cached and all(len(v) == 3 and v == sorted(v) for v in cached.values())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    transformed_rewards = [r["transformed_reward"] for r in rows if "transformed_reward" in r]
    assert len(transformed_rewards) == 2
    assert all(1.0 <= v <= math.exp(1.5) for v in transformed_rewards)
