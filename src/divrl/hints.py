"""KnowRL's knowledge-point hints (Yu et al. 2026, "KnowRL: Boosting LLM Reasoning via Reinforcement
Learning with Minimal-Sufficient Knowledge Guidance", arXiv 2604.12627; code Hasuer/KnowRL): where a
prompt's knowledge points (KPs) come from, how a subset of them is written into the prompt, and the
subset search that picks a minimal sufficient one.

KPs: a JSONL row's `hints` field (a list of strings, used as given), else, for a reasoning-gym entry
whose metadata holds a chain of + and − (`expression`, chain_sum), the running partial sums but the
last ("0 - 4 = -4", "-4 - 8 = -12" for 0 − 4 − 8 − 7), any that states the answer dropped (KnowRL
removes KPs that leak the answer). Otherwise a prompt has none and is never hinted.

The prompt: KnowRL's template puts a "## Hint" section with the numbered KPs after the problem and
before the answer instruction; here after the prompt, before `ANSWER_INSTRUCTION` if it ends with it.

The search (`subset_search`), run once per prompt with the current policy; p(S) is the pass rate of
G samples of the prompt hinted with S, K the prompt's KPs:
1. p(∅) > 0: no hint (the prompt is solvable as it is); else p(K) = 0: all of K (nothing smaller is
   shown to help).
2. Leave-one-out: the removable KPs are C = {k : p(K ∖ {k}) ≥ p(K)}; none: all of K.
3. Constrained joint removal: the sets R ⊆ C, R ≠ K (K ∖ K = ∅ is known to fail), largest first (lexicographic within a size), each
   evaluated jointly, the first with p(K ∖ R) ≥ p(K) wins — removing two KPs that each may go can
   hurt together (KnowRL's pruning interaction paradox), so no removal is assumed to compose; at
   most `joint_evaluations` such sets; then the single removal with the highest p(K ∖ {k}).
The selection is kept for the rest of training (KnowRL trains on one fixed subset per problem).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from divrl.mapping_spec import from_mapping
from divrl.tasks import ANSWER_INSTRUCTION, Example

Subset = tuple[int, ...]
# yields the subsets to evaluate next, is sent their pass rates (same order), returns the selection
Search = Generator[list[Subset], list[float], Subset]


@dataclass(frozen=True)
class HintSpec:
    joint_evaluations: int = 8  # most joint removal sets evaluated per prompt (step 3)

    @classmethod
    def parse(cls, value: Any) -> HintSpec | None:
        """From config key `knowledge_hints` (a mapping, {} for the defaults, or null); ValueError names
        the bad field."""
        spec = from_mapping(cls, value)
        if spec is None:
            return None
        if isinstance(spec.joint_evaluations, bool) or not isinstance(spec.joint_evaluations, int):
            raise ValueError(f"joint_evaluations must be an integer ≥ 0, got {spec.joint_evaluations!r}")
        if spec.joint_evaluations < 0:
            raise ValueError(f"joint_evaluations must be an integer ≥ 0, got {spec.joint_evaluations!r}")
        return spec


def chain_steps(expression: str, answer: str) -> list[str]:
    """The running partial sums of a chain "a ± b ± c …" but the last, without those equal to
    `answer`; [] for anything else."""
    tokens = expression.split()
    signs = tokens[1::2]
    try:
        numbers = [int(t) for t in tokens[::2]]
    except ValueError:
        return []
    if len(numbers) != len(signs) + 1 or any(sign not in ("+", "-") for sign in signs):
        return []
    total, steps = numbers[0], []
    for sign, number in zip(signs[:-1], numbers[1:-1]):
        after = total + number if sign == "+" else total - number
        if str(after) != answer.strip():
            steps.append(f"{total} {sign} {number} = {after}")
        total = after
    return steps


def knowledge_points(example: Example) -> list[str]:
    """The example's KPs (module docstring); ValueError for a `hints` field that is not a list of
    non-empty strings."""
    if "hints" in example.entry:
        hints = example.entry["hints"]
        if not isinstance(hints, list) or not all(isinstance(h, str) and h.strip() for h in hints):
            raise ValueError(f"'hints' must be a list of non-empty strings, got {hints!r}")
        return [h.strip() for h in hints]
    expression = (example.entry.get("metadata") or {}).get("expression")
    return chain_steps(expression, example.answer) if isinstance(expression, str) else []


def hinted_prompt(prompt: str, kps: Sequence[str]) -> str:
    """The prompt with a "## Hint" section of the numbered KPs (unchanged without KPs)."""
    if not kps:
        return prompt
    hint = "## Hint\n" + "\n".join(f"{i}. {kp}" for i, kp in enumerate(kps, start=1))
    if prompt.endswith(ANSWER_INSTRUCTION):
        body = prompt[: -len(ANSWER_INSTRUCTION)].rstrip()
        return f"{body}\n\n{hint}\n\n{ANSWER_INSTRUCTION}"
    return f"{prompt.rstrip()}\n\n{hint}"


def subset_search(n: int, joint_evaluations: int) -> Search:
    """The search over the subsets of n KPs (module docstring), as a generator: it yields the
    subsets it needs evaluated and is sent their pass rates, so a trainer can sample every
    prompt's requests of a round in one batch."""
    empty, full = (), tuple(range(n))
    if n == 0:
        yield [empty]
        return empty
    p_empty, p_full = yield [empty, full]
    if p_empty > 0:
        return empty
    if p_full == 0 or n == 1:  # one KP: leaving it out is the empty prompt, already failed
        return full
    without = [tuple(j for j in full if j != k) for k in full]
    loo = yield without
    removable = [k for k in full if loo[k] >= p_full]
    if not removable:
        return full
    # R = K would evaluate ∅ again, whose p(∅) = 0 is known: a lucky sample must not overturn it
    joint = (r for size in range(min(len(removable), n - 1), 1, -1) for r in combinations(removable, size))
    for drop in (r for r, _ in zip(joint, range(joint_evaluations))):
        kept = tuple(j for j in full if j not in drop)
        (p,) = yield [kept]
        if p >= p_full:
            return kept
    best = max(removable, key=lambda k: loo[k])  # the first of the best on ties
    return without[best]
