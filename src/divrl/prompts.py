"""Prompt selection: which training prompts a step samples, and DAPO's dynamic sampling.

`PromptSource` is the pluggable piece: `batch(step, n)` gives a step's prompts as consecutive
slices of per-epoch shuffles, and `refill(step, attempt, n)` gives fresh prompts to refill a batch
from a stream seeded by (seed, step, attempt). Both are pure functions of their arguments, so a
resumed run samples exactly what an uninterrupted one does without saving any sampler state.
Curricula and prioritized sampling are subclasses that override them.

Dynamic sampling (Yu et al. 2025, DAPO, arXiv 2503.14476 §3.2): a group whose rewards are all
equal has zero advantage everywhere and teaches nothing, so it is dropped and the batch is
refilled with fresh prompts until it holds `prompts_per_step` informative groups or `max_refills`
extra sampling rounds were spent.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from divrl.tasks import Example


class PromptSource:
    def __init__(self, examples: list[Example], seed: int):
        self.examples, self.seed = examples, seed

    def batch(self, step: int, size: int) -> list[Example]:
        """Prompts of `step` (0-based): items step·size … of the concatenated epoch shuffles."""
        n = len(self.examples)
        return [self.examples[self._epoch_order(i // n)[i % n]] for i in range(step * size, (step + 1) * size)]

    def refill(self, step: int, attempt: int, size: int) -> list[Example]:
        """`size` prompts to refill step `step`'s batch on its `attempt`-th extra round (≥ 1)."""
        rng = random.Random(f"{self.seed}:refill:{step}:{attempt}")
        return [self.examples[i] for i in rng.sample(range(len(self.examples)), min(size, len(self.examples)))]

    @functools.lru_cache(maxsize=2)
    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order


@dataclass
class Group:
    """One prompt's G scored completions."""

    example: Example
    prompt_ids: list[int]
    completions: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    rewards: list[float]

    @property
    def informative(self) -> bool:
        """Whether the rewards differ, i.e. some advantage is non-zero (DAPO's filter)."""
        return max(self.rewards) > min(self.rewards)


def split_groups(examples: list[Example], rollout, rewards: list[float]) -> list[Group]:
    """The groups of a group-major rollout of `examples` with its rewards."""
    g = rollout.group_size
    return [Group(example, rollout.prompt_ids[i], rollout.completion_ids[i * g:(i + 1) * g],
                  rollout.logprobs[i * g:(i + 1) * g], rollout.finished[i * g:(i + 1) * g],
                  rewards[i * g:(i + 1) * g]) for i, example in enumerate(examples)]
