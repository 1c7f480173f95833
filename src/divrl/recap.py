"""RECAP's online objective reweighting (Phan et al. 2025, "Beyond Reasoning Gains: Mitigating
General Capabilities Forgetting in Large Reasoning Models", arXiv 2510.21978, §4 Eq. 1, Alg. 1–2).

Each objective k keeps its loss series L_k. Once it holds 2W values (W the window), at step t:

    μ_k = mean of L_k over the last W steps        μ̃_k = mean over the W steps before those
    σ_k = sample std (1/(2W − 1)) of the last 2W values
    c_k = μ̃_k / μ_k  (convergence rate: > 1 while the loss falls, ≈ 1 once saturated)
    i_k = σ_k / (μ_k + μ̃_k)  (inverse signal-to-noise: larger for a noisier objective)
    λ_k = K · softmax((c + i)/T)_k     (Σ_k λ_k = K, so the weights average 1)

and the step's loss is (1/K) Σ_k λ_k·L_k; before 2W values every λ_k = 1. Paper defaults W = 10,
T = 5. The step's own value is in the series before its weights are computed (Alg. 1: push, then
weigh, then the loss), and σ is the pseudocode's `hist.std(unbiased=True)`, about the 2W-mean (the
text of §4 centres it on μ_k instead).

In divrl an objective is a mixture member's policy-gradient term (`divrl.mixture`), and its loss
L_k is its *reward shortfall* 1 − r̄_k (r̄_k its completions' mean reward that step, clipped to
[0, 1]): an improving task has c > 1 and gains weight, a saturated one has c ≈ 1, i ≈ 0 and loses it,
as in the paper's Figure 4. Not in the paper: ε (`eps`, default 0.05) is added to both means of c
and to the denominator of i, so a solved task (shortfall 0) is saturated, c = 1 and i = 0, instead
of 0/0, and a task whose shortfall just reached 0 does not take all the weight through c = μ̃/0.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from divrl.mapping_spec import from_mapping


@dataclass(frozen=True)
class ReweightingSpec:
    window: int = 10
    temperature: float = 5.0
    eps: float = 0.05

    @classmethod
    def parse(cls, value: Any) -> ReweightingSpec | None:
        """`mixture_reweighting`: null or {window, temperature, eps}; ValueError naming the part."""
        spec = from_mapping(cls, value)
        if spec is None:
            return None
        if isinstance(spec.window, bool) or not isinstance(spec.window, int) or spec.window < 1:
            raise ValueError(f"window: must be an integer ≥ 1, got {spec.window!r}")
        for key in ("temperature", "eps"):
            number = getattr(spec, key)
            if isinstance(number, bool) or not isinstance(number, int | float) or not 0 < number < math.inf:
                raise ValueError(f"{key}: must be a finite number > 0, got {number!r}")
        return spec


def recap_weights(losses: Sequence[Sequence[float]], window: int, temperature: float, eps: float) -> list[float]:
    """λ of each objective from its loss series (oldest first; the last 2·window values are read),
    all 1 while some series holds fewer than 2·window values (module docstring)."""
    if any(len(series) < 2 * window for series in losses):
        return [1.0] * len(losses)
    scores = []
    for series in losses:
        recent = list(series[-2 * window :])
        mu_old, mu = statistics.fmean(recent[:window]), statistics.fmean(recent[window:])
        sigma = statistics.stdev(recent)
        scores.append((mu_old + eps) / (mu + eps) + sigma / (mu + mu_old + eps))
    top = max(scores)
    exps = [math.exp((s - top) / temperature) for s in scores]
    return [len(losses) * e / sum(exps) for e in exps]


class Reweighting:
    """The members' reward-shortfall series (the last 2W values each) and their weights."""

    def __init__(self, spec: ReweightingSpec, names: Sequence[str]):
        self.spec = spec
        self.series: dict[str, list[float]] = {name: [] for name in names}

    def observe(self, rewards: Mapping[str, float]) -> dict[str, float]:
        """Append each member's shortfall 1 − r̄ (for the members sampled this step) and return
        every member's λ."""
        for name, reward in rewards.items():
            series = self.series[name]
            series.append(1.0 - min(max(reward, 0.0), 1.0))
            del series[: -2 * self.spec.window]
        weights = recap_weights(list(self.series.values()), self.spec.window, self.spec.temperature, self.spec.eps)
        return dict(zip(self.series, weights))

    def state_dict(self) -> dict[str, list[float]]:
        return {name: list(series) for name, series in self.series.items()}

    def load_state_dict(self, state: Mapping[str, Sequence[float]]) -> None:
        self.series = {name: list(state[name]) for name in self.series}
