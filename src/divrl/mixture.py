"""Task mixtures: several tasks in one run, with per-task weights, verifiers and metrics.

`task: mixture` with `mixture: [{task, weight, params, verifier, name}, …]`: each member is a task
as `task` names one (a reasoning-gym dataset with `params` as its `task_params`, or a .jsonl file
with its `verifier`), built with the run's train_size, eval_size and seeds; `name` (default: the
dataset name or the file's stem) tags its examples and names its metrics. Every prompt is scored
by its own member's verifier (`MixtureTask.score`).

Each step's P prompts are shared among the members by systematic sampling (`allocate`): member k
gets ⌊w_k·P⌋ or ⌈w_k·P⌉ prompts (w normalized to sum 1), the rounding drawn with a seed of
(seed, step), so the expected share is exactly w_k·P and a run is reproducible. A member's prompts
come from its own prompt source (`prompt_sampler`), whose stream advances by the member's share
(`MixtureSource`). Metrics: reward/<name> and pass_rate/<name> per step (of the member's sampled
completions), eval_pass@1/<name> (and its standard error eval_pass@1_se/<name>) per evaluation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from divrl.prompts import PromptSource, build_source
from divrl.tasks import Example, Task, TaskError

MEMBER_KEYS = ("task", "weight", "params", "verifier", "name")


@dataclass(frozen=True)
class Member:
    name: str
    task: str
    weight: float
    params: dict
    verifier: str


def parse_mixture(task: str, value: Any) -> list[Member]:
    """The members `mixture` lists ([] when `task` is not 'mixture'); ValueError naming the key,
    e.g. "'mixture[1].weight' must be > 0, got 0"."""
    if task != "mixture":
        if value is not None:
            raise ValueError(f"'task' must be 'mixture' when 'mixture' lists tasks, got {task!r}")
        return []
    if not isinstance(value, list) or not value:
        raise ValueError(f"'mixture' must list the tasks of task: mixture, got {value!r}")
    members: list[Member] = []
    for i, item in enumerate(value):
        where = f"mixture[{i}]"
        if not isinstance(item, dict) or "task" not in item:
            raise ValueError(f"'{where}' must be a mapping with a 'task', got {item!r}")
        unknown = sorted(set(item) - set(MEMBER_KEYS))
        if unknown:
            raise ValueError(f"'{where}' has unknown keys {unknown}; valid: {', '.join(MEMBER_KEYS)}")
        name, weight = item["task"], item.get("weight", 1.0)
        params, verifier = item.get("params") or {}, item.get("verifier", "exact")
        if not isinstance(name, str) or not name or name == "mixture":
            raise ValueError(f"'{where}.task' must name a reasoning-gym dataset or a .jsonl file, got {name!r}")
        _check_task(name, f"{where}.task")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not (math.isfinite(weight) and weight > 0)
        ):
            raise ValueError(f"'{where}.weight' must be a finite number > 0, got {weight!r}")
        if not isinstance(params, dict):
            raise ValueError(f"'{where}.params' must be a mapping of create_dataset arguments, got {params!r}")
        if not isinstance(verifier, str):
            raise ValueError(f"'{where}.verifier' must be 'exact' or 'module:function', got {verifier!r}")
        label = item.get("name", Path(name).stem if name.endswith(".jsonl") else name)
        if not isinstance(label, str) or not label or "/" in label:
            raise ValueError(f"'{where}.name' must be a non-empty string without '/', got {label!r}")
        if label in (m.name for m in members):
            raise ValueError(f"'{where}.name': '{label}' names two members; give one another 'name'")
        members.append(Member(label, name, float(weight), params, verifier))
    return members


def _check_task(name: str, key: str) -> None:
    """Refuse a missing .jsonl file or an unknown reasoning-gym dataset before any model loads."""
    if name.endswith(".jsonl"):
        if not Path(name).is_file():
            raise ValueError(f"'{key}': task file '{name}' does not exist")
        return
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise ValueError(
            f"'{key}': unknown task '{name}': not a .jsonl file and not a reasoning-gym dataset. "
            f"Valid reasoning-gym names: {', '.join(sorted(DATASETS))}"
        )


class MixtureTask(Task):
    """The members' tasks side by side: train and eval are their examples, each tagged with its
    member's name (`Example.task`), and `score` calls that member's verifier."""

    def __init__(self, members: Sequence[Member], cfg):
        from divrl.tasks import build_task

        self.name = "mixture"
        self.weights = {m.name: m.weight for m in members}
        self.members: dict[str, Task] = {}
        self.train, self.eval = [], []
        for i, m in enumerate(members):
            try:
                task = build_task(dataclasses.replace(cfg, task=m.task, task_params=m.params, verifier=m.verifier))
            except TaskError as err:
                raise TaskError(f"config key 'mixture[{i}]': {err}") from None
            self.members[m.name] = task
            self.train += [dataclasses.replace(e, task=m.name) for e in task.train]
            self.eval += [dataclasses.replace(e, task=m.name) for e in task.eval]
        self.numeric = all(task.numeric for task in self.members.values())

    def score(self, completion: str, example: Example) -> float:
        assert example.task is not None  # every mixture example is tagged with its member
        return self.members[example.task].score(completion, example)


def allocate(weights: Sequence[float], size: int, key: str) -> list[int]:
    """How many of `size` prompts each weight's member gets: systematic sampling, i.e. the points
    u, u + 1, …, u + size − 1 (u uniform in [0, 1), seeded by `key`) counted in the intervals of
    the cumulative shares size·w_k/Σw. Member k gets ⌊size·w_k/Σw⌋ or one more, in expectation
    exactly size·w_k/Σw; the counts sum to `size`."""
    u = random.Random(key).random()
    total = sum(weights)
    edges = [size * c / total for c in itertools.accumulate(weights)]
    edges[-1] = size  # exact, whatever the float rounding
    cuts = [0, *(math.ceil(edge - u) for edge in edges)]
    return [b - a for a, b in itertools.pairwise(cuts)]


class MixtureSource(PromptSource):
    """A step's prompts from each member's own source, in the members' shares (`allocate`)."""

    def __init__(self, sources: Mapping[str, PromptSource], weights: Mapping[str, float], seed: int):
        super().__init__([e for source in sources.values() for e in source.examples], seed)
        self.sources, self.weights = dict(sources), [weights[name] for name in sources]
        self._starts: dict[int, list[list[int]]] = {}  # per batch size: each step's stream offsets

    def _counts(self, step: int, size: int, attempt: int = 0) -> list[int]:
        return allocate(self.weights, size, f"{self.seed}:mixture:{step}:{attempt}")

    def batch(self, step: int, size: int) -> list[Example]:
        starts = self._starts.setdefault(size, [[0] * len(self.sources)])
        while len(starts) <= step:  # a member's stream advances by its share of each earlier step
            starts.append([a + n for a, n in zip(starts[-1], self._counts(len(starts) - 1, size))])
        counts = self._counts(step, size)
        return [
            e
            for source, start, n in zip(self.sources.values(), starts[step], counts)
            for e in source.draw(step, start, n)
        ]

    def refill(self, step: int, attempt: int, size: int) -> list[Example]:
        counts = self._counts(step, size, attempt)
        return [e for source, n in zip(self.sources.values(), counts) if n for e in source.refill(step, attempt, n)]

    def observe(self, examples: list[Example], pass_rates: list[float]) -> None:
        for name, source in self.sources.items():
            mine = [(e, p) for e, p in zip(examples, pass_rates) if e.task == name]
            source.observe([e for e, _ in mine], [p for _, p in mine])

    def state_dict(self) -> dict[str, Any]:
        return {name: source.state_dict() for name, source in self.sources.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, source in self.sources.items():
            source.load_state_dict(state[name])


def build_mixture_source(sampler: Any, examples: list[Example], task: MixtureTask, seed: int) -> MixtureSource:
    """A `MixtureSource` of `examples` (the training prompts left for the policy gradient), one
    `prompt_sampler` source per member (seeded seed + its index)."""
    sources = {}
    for i, name in enumerate(task.weights):
        mine = [e for e in examples if e.task == name]
        if not mine:
            raise TaskError(f"config key 'mixture[{i}]': member '{name}' has no training prompt left")
        sources[name] = build_source(sampler, mine, seed + i)
    return MixtureSource(sources, task.weights, seed)
