"""Responses sampled once from the initial policy and stored with their log-probs: DPH-RL's
rehearsal set (no online reference model is needed to regularize toward them) and the offline
training set of ReasonMaxxer (no generation during training).

`StoredResponses` holds, for some training prompts (by index into the task's training split),
G completions each, the log-probs of their tokens under the policy that sampled them (the
initial weights, at the training temperature) and their rewards. It is sampled when a run
starts and written to ``stored_responses.json`` in the run directory, so a resumed run reuses
the very same set. `split` separates the prompts the initial policy already solves (their
responses feed the stored terms) from the rest (trained by the policy gradient), as DPH-RL does;
`select_offline` picks ReasonMaxxer's training set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

FILENAME = "stored_responses.json"


@dataclass
class StoredGroup:
    index: int  # the prompt's index in the task's training split (or in the demonstrations)
    completions: list[list[int]]
    logprobs: list[list[float]]
    rewards: list[float]
    prompt: str | None = None  # the prompt's text when it is not a training prompt (a demonstration)

    def pass_rate(self, threshold: float) -> float:
        return sum(r >= threshold for r in self.rewards) / len(self.rewards)


def save(groups: list[StoredGroup], run_dir: Path) -> None:
    tmp = run_dir / f".{FILENAME}.tmp"
    tmp.write_text(json.dumps([asdict(g) for g in groups]))
    tmp.replace(run_dir / FILENAME)


def load(run_dir: Path) -> list[StoredGroup] | None:
    path = run_dir / FILENAME
    if not path.is_file():
        return None
    return [StoredGroup(**row) for row in json.loads(path.read_text())]


def split(groups: list[StoredGroup], solved: float, pass_threshold: float) -> tuple[list[StoredGroup], set[int]]:
    """(groups whose pass rate is ≥ `solved`, the indices of those prompts)."""
    kept = [g for g in groups if g.pass_rate(pass_threshold) >= solved]
    return kept, {g.index for g in kept}


def batch(groups: list[StoredGroup], step: int, size: int) -> list[StoredGroup]:
    """Step `step`'s `size` groups, cycling through the set in order."""
    if not groups:
        return []
    return [groups[(step * size + i) % len(groups)] for i in range(min(size, len(groups)))]


def kept_per_prompt(samples: int, shortest: float) -> int:
    """How many of a prompt's `samples` responses `select_offline` keeps: round(shortest·samples)."""
    return max(1, int(shortest * samples + 0.5))


def select_offline(groups: list[StoredGroup], keep: int, shortest: float, pass_threshold: float) -> list[StoredGroup]:
    """ReasonMaxxer's training set (arXiv 2605.06241, authors' code; methods notes): the prompts
    with 1 ≤ #passes ≤ G − 1; of those the `keep` whose pass rate is closest to 0.5 (0: all; ties
    by prompt order); of each, its `kept_per_prompt` shortest responses (ties by sample order),
    kept in sample order. Per prompt, so every kept group has the same size."""
    informative = [g for g in groups if 0 < g.pass_rate(pass_threshold) < 1]
    informative.sort(key=lambda g: abs(g.pass_rate(pass_threshold) - 0.5))
    chosen = sorted(informative[: keep or len(informative)], key=lambda g: g.index)
    n = kept_per_prompt(len(groups[0].completions), shortest) if groups else 0
    out = []
    for g in chosen:
        rows = sorted(sorted(range(len(g.completions)), key=lambda i: len(g.completions[i]))[:n])
        out.append(
            replace(
                g,
                completions=[g.completions[i] for i in rows],
                logprobs=[g.logprobs[i] for i in rows],
                rewards=[g.rewards[i] for i in rows],
            )
        )
    return out
