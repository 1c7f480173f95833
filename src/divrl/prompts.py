"""Prompt selection: which training prompts a step samples, and DAPO's dynamic sampling.

`PromptSource` is the pluggable piece: `batch(step, n)` gives a step's prompts as consecutive
slices of per-epoch shuffles, and `refill(step, attempt, n)` gives fresh prompts to refill a batch
from a stream seeded by (seed, step, attempt); `observe` hears each sampled prompt's pass rate.
Curricula and prioritized sampling are subclasses (`GaussianCurriculum`); their state is
`state_dict()`, saved in each checkpoint, so a resumed run samples exactly what an uninterrupted
one does. `prompt_sampler` in the config names one (`build_source`).

Dynamic sampling (Yu et al. 2025, DAPO, arXiv 2503.14476 §3.2): a group whose rewards are all
equal has zero advantage everywhere and teaches nothing, so it is dropped and the batch is
refilled with fresh prompts until it holds `prompts_per_step` informative groups or `max_refills`
extra sampling rounds were spent.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from divrl.spec import named_choices
from divrl.tasks import Example


class PromptSource:
    def __init__(self, examples: list[Example], seed: int):
        self.examples, self.seed = examples, seed
        self._orders: dict[int, list[int]] = {}  # the last 2 epochs' shuffles, per instance

    def batch(self, step: int, size: int) -> list[Example]:
        """Prompts of `step` (0-based): items step·size … of the concatenated epoch shuffles."""
        return self.draw(step, step * size, size)

    def draw(self, step: int, start: int, size: int) -> list[Example]:
        """`size` prompts for `step`, items start … of the concatenated epoch shuffles (a mixture
        member's stream advances by its own share of each step: `divrl.mixture`)."""
        n = len(self.examples)
        return [self.examples[self._epoch_order(i // n)[i % n]] for i in range(start, start + size)]

    def refill(self, step: int, attempt: int, size: int) -> list[Example]:
        """`size` prompts to refill step `step`'s batch on its `attempt`-th extra round (≥ 1)."""
        rng = random.Random(f"{self.seed}:refill:{step}:{attempt}")
        return [self.examples[i] for i in rng.sample(range(len(self.examples)), min(size, len(self.examples)))]

    def observe(self, examples: list[Example], pass_rates: list[float]) -> None:
        """The pass rate of each prompt sampled this step (the base source ignores them)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def _epoch_order(self, epoch: int) -> list[int]:
        order = self._orders.get(epoch)
        if order is None:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            if len(self._orders) >= 2:
                del self._orders[next(iter(self._orders))]
            self._orders[epoch] = order
        return order


class GaussianCurriculum(PromptSource):
    """FG-ExPO's Gaussian curriculum sampling (arXiv 2605.11403 §3.3, Alg. 1): each prompt keeps an
    EMA of its pass rate, p̃ ← α·p̃ + (1 − α)·p̂, updated only when sampled and starting at 0.5;
    a batch is drawn without replacement with Pr[q] ∝ exp(−(p̃_q − 0.5)²/(2σ²)), favouring the
    prompts at the frontier of competence. Paper defaults α = 0.9, σ = 0.35. The draw is seeded by
    (seed, step, attempt), so with the EMA restored from the checkpoint a resumed run repeats it."""

    def __init__(self, examples: list[Example], seed: int, alpha: float = 0.9, sigma: float = 0.35):
        super().__init__(examples, seed)
        self.alpha, self.sigma = alpha, sigma
        self.ema = torch.full((len(examples),), 0.5, dtype=torch.float64)
        self._index = {id(example): i for i, example in enumerate(examples)}

    @staticmethod
    def check(alpha: float = 0.9, sigma: float = 0.35) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha: must lie in [0, 1), got {alpha!r}")
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma: must be a finite number > 0 (the curriculum's width), got {sigma!r}")

    def weights(self) -> torch.Tensor:
        """The draw's weights, scaled so that the largest is 1: in log space, since for a small σ
        exp(−(p̃ − 0.5)²/(2σ²)) itself underflows to 0 for every prompt (no distribution left)."""
        log_weights = -((self.ema - 0.5) ** 2) / (2 * self.sigma**2)
        return torch.exp(log_weights - log_weights.max())

    def _draw(self, key: str, size: int) -> list[Example]:
        if size <= 0:  # a mixture task's share of a step can round to 0 prompts
            return []
        generator = torch.Generator().manual_seed(random.Random(key).getrandbits(63))
        chosen = torch.multinomial(
            self.weights(), min(size, len(self.examples)), replacement=False, generator=generator
        )
        return [self.examples[i] for i in chosen.tolist()]

    def draw(self, step: int, start: int, size: int) -> list[Example]:
        return self._draw(f"{self.seed}:curriculum:{step}", size)

    def refill(self, step: int, attempt: int, size: int) -> list[Example]:
        return self._draw(f"{self.seed}:curriculum:{step}:{attempt}", size)

    def observe(self, examples: list[Example], pass_rates: list[float]) -> None:
        for example, rate in zip(examples, pass_rates):
            i = self._index[id(example)]
            self.ema[i] = self.alpha * self.ema[i] + (1 - self.alpha) * rate

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema = torch.tensor(state["ema"], dtype=torch.float64)


SAMPLERS: dict[str, type[PromptSource]] = {"sequential": PromptSource, "gaussian_curriculum": GaussianCurriculum}


def parse_sampler(value: Any) -> tuple[str, dict[str, Any]]:
    """`prompt_sampler`: a name or {name: {params}}; raises ValueError naming the bad part."""
    ((name, params),) = named_choices(value, "", "prompt sampler", list(SAMPLERS), single=True)
    check = getattr(SAMPLERS[name], "check", None)
    if check is None and params:
        raise ValueError(f"{name} takes no parameters, got {params!r}")
    if check is not None:
        try:
            check(**params)
        except TypeError as err:
            raise ValueError(f"{name}: {err}") from None
    return name, params


def build_source(value: Any, examples: list[Example], seed: int) -> PromptSource:
    name, params = parse_sampler(value)
    return SAMPLERS[name](examples, seed, **params)


@dataclass
class Group:
    """One prompt's G scored completions. `prompt_ids` end with `prefix`, the off-policy tokens the
    completions continue (PrefixRL, `divrl.prefix_replay`; empty without): scored with the
    completions, never trained on. `hints`: the indices of the knowledge points written into the
    prompt (KnowRL, `divrl.hints`; empty without)."""

    example: Example
    prompt_ids: list[int]
    completions: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    rewards: list[float]
    prefix: list[int] = field(default_factory=list)
    hints: tuple[int, ...] = ()

    @property
    def informative(self) -> bool:
        """Whether the rewards differ, i.e. some advantage is non-zero (DAPO's filter)."""
        return max(self.rewards) > min(self.rewards)


def split_groups(
    examples: list[Example], rollout, rewards: list[float], prefixes: list[list[int]] | None = None
) -> list[Group]:
    """The groups of a group-major rollout of `examples` with its rewards (and each prompt's prefix)."""
    g = rollout.group_size
    return [
        Group(
            example,
            rollout.prompt_ids[i],
            rollout.completion_ids[i * g : (i + 1) * g],
            rollout.logprobs[i * g : (i + 1) * g],
            rollout.finished[i * g : (i + 1) * g],
            rewards[i * g : (i + 1) * g],
            [] if prefixes is None else prefixes[i],
        )
        for i, example in enumerate(examples)
    ]
