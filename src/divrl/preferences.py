"""Preference pairs and the pairwise losses of DPO, IPO and INPO (config key `preference`).

A pair is a prompt with a chosen and a rejected completion (token ids) and the summed log-probs of
each under the reference, computed once when the pair is made and cached with it (so a pure DPO
run holds no second model), plus — for INPO — under π_t, the policy that sampled the pair. With
Δ_m = log π_m(y_w|x) − log π_m(y_l|x) for a model m (sums over the completion's tokens), per pair:

- ``dpo`` (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7): ℓ = −log σ(β·(Δ_θ − Δ_ref)).
- ``ipo`` (Azar et al. 2023, arXiv 2310.12036, Eq. 17, τ = β): ℓ = (h − 1/(2β))² with
  h = (log π_θ/π_ref)(y_w)/|y_w| − (log π_θ/π_ref)(y_l)/|y_l|: the log-ratios averaged over each
  completion's tokens, as TRL 1.16 does (its `ipo` loss; TRL's note says the IPO authors confirmed
  the paper's results use this length-normalized form).
- ``inpo`` (Zhang et al. 2024, "Iterative Nash Policy Optimization", arXiv 2407.00617, ICLR 2025,
  Algorithm 1; η the inverse step size, τ the KL strength, 0 < τ < η):
  ℓ = (Δ_θ − (τ/η)·Δ_ref − ((η − τ)/η)·Δ_t − 1/(2η))². On pairs sampled from π_t and labelled by
  a preference P, its minimizer is π_{t+1} ∝ π_t^{1−τ/η}·π_ref^{τ/η}·exp(P(y ≻ π_t)/η)
  (`divrl.lab.inpo_step`, tested in the exact tabular lab).

Data (`read`): JSONL with ``prompt``, ``chosen``, ``rejected``, each a string, or in the Hugging
Face conversational convention a list of ``{role, content}`` messages — then ``prompt`` is one user
message and ``chosen``/``rejected`` end with one assistant message; without a ``prompt`` field the
prompt is the conversation before that last message (the same in both). A bad line is refused with
its file:line. Without a file, pairs are built from the task (`pairs_from_samples`): each prompt's
samples, chosen = the first sample with the highest reward and rejected = the first with the
lowest, kept where the first passes the verifier and the second does not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from divrl.mapping_spec import from_mapping
from divrl.tasks import jsonl_rows

LOSSES = ("dpo", "ipo", "inpo")
DIRECTORY = "preference_pairs"


class PreferenceError(ValueError):
    """A preference file that cannot be read."""


@dataclass(frozen=True)
class PreferenceSpec:
    """Config key `preference`."""

    loss: str = "dpo"
    beta: float = 0.1  # DPO's β; IPO's τ
    eta: float = 7.5e-3  # INPO's inverse step size η
    tau: float = 2.5e-3  # INPO's KL strength τ (η/3)
    coef: float = 1.0  # weight of the pairwise loss beside the online objective
    pairs_per_step: int = 8
    data: str | None = None  # JSONL of pairs; null: built from the task
    prompts: int = 32  # without a file: the training prompts sampled for pairs (per round)
    samples: int = 8  # without a file: completions sampled per prompt
    round_steps: int = 0  # > 0: pairs re-sampled from the current policy every round_steps steps

    @classmethod
    def parse(cls, value: dict | None) -> PreferenceSpec | None:
        """From config key `preference` (a mapping or null); ValueError names a bad field."""
        spec = from_mapping(cls, value)
        if spec is None:
            return None
        if spec.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {spec.loss!r}")
        for name in ("beta", "eta", "coef"):
            number = getattr(spec, name)
            if not isinstance(number, int | float) or not math.isfinite(number) or number <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {number!r}")
        if not isinstance(spec.tau, int | float) or not 0 <= spec.tau < spec.eta:
            raise ValueError(f"tau must satisfy 0 ≤ tau < eta (INPO), got tau {spec.tau!r}, eta {spec.eta!r}")
        for name in ("pairs_per_step", "prompts", "samples"):
            if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {getattr(spec, name)!r}")
        if not isinstance(spec.round_steps, int) or spec.round_steps < 0:
            raise ValueError(f"round_steps must be an integer ≥ 0, got {spec.round_steps!r}")
        if spec.loss == "inpo" and not spec.round_steps:
            raise ValueError("loss inpo needs round_steps ≥ 1 (its pairs are sampled from each round's policy π_t)")
        if spec.data is not None and spec.round_steps:
            raise ValueError(
                "data (a fixed file of pairs) and round_steps (pairs re-sampled each round) exclude each other"
            )
        return spec


def describe(spec: PreferenceSpec) -> str:
    """One line, e.g. 'dpo on preference pairs (β 0.1), coef 1'."""
    strength = (
        f"η {spec.eta:g}, τ {spec.tau:g}, rounds of {spec.round_steps} steps"
        if spec.loss == "inpo"
        else f"β {spec.beta:g}"
    )
    return f"{spec.loss} on preference pairs ({strength}), coef {spec.coef:g}"


@dataclass
class Pair:
    prompt: str
    chosen: list[int]
    rejected: list[int]
    reference: list[float] = field(default_factory=list)  # [Σ log π_ref(y_w), Σ log π_ref(y_l)]
    anchor: list[float] | None = None  # INPO: [Σ log π_t(y_w), Σ log π_t(y_l)] of the round's policy


@dataclass(frozen=True)
class TextPair:
    prompt: str
    chosen: str
    rejected: str


def _text(value: Any, where: str, name: str) -> str:
    """A field as text: a non-empty string, or the content of a conversation's last message."""
    if isinstance(value, list):
        if not value or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
            raise PreferenceError(f"{where}: '{name}' must be a string or a list of {{role, content}} messages")
        value = value[-1]["content"]
    if not isinstance(value, str) or not value.strip():
        raise PreferenceError(f"{where}: '{name}' must be a non-empty string or end with a non-empty message")
    return value


def _prompt(row: dict, where: str) -> str:
    """The prompt: the `prompt` field, or the conversation before the chosen answer's last message."""
    prompt = row.get("prompt")
    if prompt is None:
        before = [row[k][:-1] if isinstance(row.get(k), list) else None for k in ("chosen", "rejected")]
        if before[0] is None or before[0] != before[1]:
            raise PreferenceError(
                f"{where}: without a 'prompt' field, 'chosen' and 'rejected' must be conversations "
                f"with the same messages before their last one"
            )
        prompt = before[0]
    if isinstance(prompt, list) and not (
        len(prompt) == 1 and isinstance(prompt[0], dict) and prompt[0].get("role") == "user"
    ):
        raise PreferenceError(
            f"{where}: a conversational prompt must be one user message (multi-turn is not supported)"
        )
    return _text(prompt, where, "prompt")


def read(path: str | Path) -> list[TextPair]:
    """The pairs of a JSONL file; PreferenceError names the file and line of a bad row."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceError(f"preference file '{path}' does not exist")
    pairs = []
    for where, row in jsonl_rows(path, PreferenceError):
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            raise PreferenceError(f"{where}: a row needs 'chosen' and 'rejected' fields (and 'prompt')")
        chosen, rejected = _text(row["chosen"], where, "chosen"), _text(row["rejected"], where, "rejected")
        pairs.append(TextPair(_prompt(row, where), chosen, rejected))
    if not pairs:
        raise PreferenceError(f"preference file '{path}' holds no pair")
    return pairs


def pairs_from_samples(
    prompts: Sequence[str],
    completions: Sequence[Sequence[list[int]]],
    rewards: Sequence[Sequence[float]],
    threshold: float,
) -> list[Pair]:
    """One pair per prompt whose samples both pass and fail: chosen = the first sample with the
    highest reward, rejected = the first with the lowest (a verifier's preference)."""
    pairs = []
    for prompt, samples, scores in zip(prompts, completions, rewards):
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        if scores[best] >= threshold > scores[worst]:
            pairs.append(Pair(prompt, list(samples[best]), list(samples[worst])))
    return pairs


def pair_loss(
    spec: PreferenceSpec,
    policy: torch.Tensor,
    reference: torch.Tensor,
    anchor: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss (P,) from summed log-probs of shape (P, 2) (column 0 chosen, 1 rejected): the
    policy's (with gradient), the reference's and, for INPO, π_t's; `lengths` (P, 2) token counts
    (IPO). See the module docstring for the formulas."""
    if spec.loss == "ipo":
        assert lengths is not None  # IPO averages over each completion's tokens
        ratio = (policy - reference) / lengths
        return (ratio[:, 0] - ratio[:, 1] - 1 / (2 * spec.beta)) ** 2
    margin = lambda logps: logps[:, 0] - logps[:, 1]  # noqa: E731
    if spec.loss == "dpo":
        return -F.logsigmoid(spec.beta * (margin(policy) - margin(reference)))
    assert anchor is not None  # INPO's π_t log-probs come with each round's pairs
    eta, tau = spec.eta, spec.tau
    h = margin(policy) - (tau / eta) * margin(reference) - ((eta - tau) / eta) * margin(anchor)
    return (h - 1 / (2 * eta)) ** 2


def batch(pairs: list[Pair], step: int, size: int) -> list[Pair]:
    """Step `step`'s `size` pairs, cycling through the set in order."""
    return [pairs[(step * size + i) % len(pairs)] for i in range(min(size, len(pairs)))] if pairs else []


def save(pairs: list[Pair], run_dir: Path, round_: int) -> None:
    directory = run_dir / DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".round-{round_}.json.tmp"
    tmp.write_text(json.dumps([asdict(p) for p in pairs]))
    tmp.replace(directory / f"round-{round_}.json")


def load(run_dir: Path, round_: int) -> list[Pair] | None:
    path = run_dir / DIRECTORY / f"round-{round_}.json"
    return [Pair(**row) for row in json.loads(path.read_text())] if path.is_file() else None
