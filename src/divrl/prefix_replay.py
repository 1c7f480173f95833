"""PrefixRL's off-policy prefixes (Setlur et al. 2026, "Reuse your FLOPs: Scaling RL on Hard Problems
by Conditioning on Very Off-Policy Prefixes", arXiv 2601.18795): a replay buffer of correct traces
per prompt, and the rule that cuts a prefix from one of them for a step's rollout.

A prefixed problem is concat(x, y_{1:h}), the first h tokens of a correct trace y of prompt x; the
policy samples the continuation on-policy, the verifier scores prefix + continuation as the answer,
and the loss sees the continuation only (the prefix is part of the prompt ids the update is given),
so no off-policy token is trained on. Per step, each prompt with a trace in the buffer is prefixed
with probability `probability`; its trace is drawn uniformly from the prompt's traces and
h = ⌊f·|y|⌋, f ~ U[min_fraction, max_fraction], clamped to 1 … |y| − 1 (at least one token
is the policy's own). The draws come from a stream seeded by (seed, step, round), not the sampling
generator, so a run with the buffer empty samples exactly what a run without PrefixRL does.

The buffer keeps the newest `per_prompt` distinct passing completions per prompt text: those of
unprefixed rollouts (a prefixed one is partly off-policy) and, with `seed_prompts: N`, those of
rejection sampling of the initial policy on the first N training prompts (`stored_samples` answers
each), the paper's source of traces. It is saved in each checkpoint.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from divrl.mapping_spec import from_mapping


@dataclass(frozen=True)
class PrefixSpec:
    probability: float = 0.5  # share of a step's prompts with a trace that get a prefix
    min_fraction: float = 0.2  # prefix length as a fraction of the trace, drawn uniformly
    max_fraction: float = 0.8
    per_prompt: int = 4  # traces kept per prompt (newest first out)
    seed_prompts: int = 0  # rejection-sample the initial policy on this many training prompts

    @classmethod
    def parse(cls, value: Any) -> PrefixSpec | None:
        """From config key `prefix_replay` (a mapping, {} for the defaults, or null); ValueError names
        the bad field."""
        spec = from_mapping(cls, value)
        if spec is None:
            return None
        number = lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        count = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        for key, ok, allowed in (
            ("probability", number(spec.probability) and 0 <= spec.probability <= 1, "a number in [0, 1]"),
            ("min_fraction", number(spec.min_fraction) and 0 < spec.min_fraction < 1, "a number in (0, 1)"),
            (
                "max_fraction",
                number(spec.max_fraction) and spec.min_fraction <= spec.max_fraction < 1,
                f"a number in [min_fraction ({spec.min_fraction}), 1)",
            ),
            ("per_prompt", count(spec.per_prompt) and spec.per_prompt >= 1, "an integer ≥ 1"),
            ("seed_prompts", count(spec.seed_prompts) and spec.seed_prompts >= 0, "an integer ≥ 0 (0: no seeding)"),
        ):
            if not ok:
                raise ValueError(f"{key} must be {allowed}, got {getattr(spec, key)!r}")
        return spec


class TraceBuffer:
    """Correct traces (completion token ids) per prompt text, the newest `per_prompt` distinct ones."""

    def __init__(self, per_prompt: int):
        self.per_prompt = per_prompt
        self.traces: dict[str, list[list[int]]] = {}

    def add(self, prompt: str, trace: Sequence[int]) -> None:
        kept = self.traces.setdefault(prompt, [])
        trace = list(trace)
        if trace in kept:
            kept.remove(trace)
        kept.append(trace)
        del kept[: -self.per_prompt]

    def __len__(self) -> int:
        return sum(map(len, self.traces.values()))

    def state_dict(self) -> dict[str, list[list[int]]]:
        return self.traces

    def load_state_dict(self, state: Mapping[str, list[list[int]]]) -> None:
        self.traces = {prompt: [list(t) for t in traces] for prompt, traces in state.items()}


def prefix_length(trace_length: int, fraction: float) -> int:
    """h = ⌊fraction·|y|⌋, clamped to 1 … |y| − 1; 0 for a trace too short to split."""
    if trace_length < 2:
        return 0
    return min(max(math.floor(fraction * trace_length), 1), trace_length - 1)


def choose_prefixes(spec: PrefixSpec, buffer: TraceBuffer, prompts: Sequence[str], key: str) -> list[list[int]]:
    """The off-policy prefix of each prompt ([] for none), drawn from the stream seeded by `key`:
    per prompt one uniform for prefixed-or-not, one for the trace, one for the fraction."""
    rng = random.Random(key)
    out: list[list[int]] = []
    for prompt in prompts:
        use, pick, fraction = rng.random(), rng.random(), rng.uniform(spec.min_fraction, spec.max_fraction)
        traces = buffer.traces.get(prompt)
        if not traces or use >= spec.probability:
            out.append([])
            continue
        trace = traces[int(pick * len(traces))]
        out.append(trace[: prefix_length(len(trace), fraction)])
    return out
