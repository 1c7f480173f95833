"""InfAlign's calibrate-and-transform reward (CTRL; Balashankar et al., "InfAlign: Inference-aware
language model alignment", arXiv 2412.19792, ICML 2025), as a reward wrapper of training.

Calibration: C(x, y) = P_{z∼π_ref(·|x)}[r(x, z) < r(x, y)] + ½·P[r(x, z) = r(x, y)], estimated from
K reference samples per prompt (mid-rank for ties, so C is Uniform-like under π_ref and a tie counts
half a win). Transform (`transform`): the paper's exponential family, increasing in C for every t,
r̃ = Φ_t(C) = exp(t·C) for t > 0 (best-of-N), −exp(−|t|·C) = −exp(t·C) for t < 0 (worst-of-N,
best-of-N jailbreaking: the lower quantiles weigh most), and C itself at t = 0 (calibration alone,
which the paper reports as a strong baseline for the standard win rate). The transformed reward
then enters KL-regularized RL unchanged (C1).

Confirmed from the paper's abstract and the authors' summary: the two steps, calibration against
the base policy, the exponential family with a positive exponent for best-of-N and a transform
for best-of-N jailbreaking. Not read (the paper body, §4, was unreachable here): its exact
worst-of-N formula (−exp(−t·C), t > 0, as recalled, here written with t < 0), its table of t
per N and its K; the mid-rank tie rule and the t = 0 identity are ours. The task's verdict
(`passed`, pass rates, pass@k) stays the raw reward's; only the return of the policy gradient is
transformed.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CalibrationSpec:
    samples: int = 8  # K reference samples per prompt
    t: float = 0.0  # exponent of the transform

    @classmethod
    def parse(cls, value: dict | None) -> CalibrationSpec | None:
        """From config key `reward_calibration` ({samples, t} or null); ValueError names a bad field."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping {{samples: K, t: T}} or null, got {value!r}")
        unknown = set(value) - {"samples", "t"}
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; it takes samples and t")
        spec = cls(**value)
        if isinstance(spec.samples, bool) or not isinstance(spec.samples, int) or spec.samples < 1:
            raise ValueError(f"samples must be an integer ≥ 1, got {spec.samples!r}")
        if isinstance(spec.t, bool) or not isinstance(spec.t, int | float) or not math.isfinite(spec.t):
            raise ValueError(f"t must be a finite number, got {spec.t!r}")
        return spec


def calibrated(reward: float, reference_rewards: Sequence[float]) -> float:
    """C = (#{z: r_z < r} + ½·#{z: r_z = r}) / K over K reference rewards given sorted ascending."""
    below = bisect.bisect_left(reference_rewards, reward)
    ties = bisect.bisect_right(reference_rewards, reward) - below
    return (below + 0.5 * ties) / len(reference_rewards)


def transform(c: torch.Tensor, t: float) -> torch.Tensor:
    """Φ_t(C): exp(t·C) for t > 0, −exp(t·C) for t < 0 (both increasing in C), C for t = 0."""
    if t == 0:
        return c
    return math.copysign(1.0, t) * torch.exp(t * c)


def transformed(rewards: torch.Tensor, reference_rewards: Sequence[Sequence[float]], t: float) -> torch.Tensor:
    """Φ_t(C) of group-major rewards (len(rewards) / len(reference_rewards) per prompt), each
    calibrated against its prompt's sorted reference rewards."""
    group = len(rewards) // len(reference_rewards)
    c = torch.tensor(
        [calibrated(float(r), reference_rewards[i // group]) for i, r in enumerate(rewards)], dtype=rewards.dtype
    )
    return transform(c, t)
