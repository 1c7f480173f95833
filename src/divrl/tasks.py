"""Tasks: prompts with reference answers, and a verifier that scores a completion.

Built in:
- any reasoning-gym dataset by name (+ `create_dataset` params), scored by that dataset's own
  `score_answer` on the extracted final answer;
- a JSONL file with `prompt` and `answer` fields, scored by exact match of the extracted answer
  or by a user function `module:function` called as `f(completion, answer) -> float`.

Final-answer extraction (`extract_answer`), in order: the last `<answer>…</answer>` span; else the
last `\\boxed{…}`; else the last number in the text (e.g. "The answer is 7." → "7"); else the whole
stripped completion.

The training and held-out splits never share a prompt: the reasoning-gym held-out split is
generated with `eval_seed` and its prompts are removed from the training split (generated with
`seed`) — small prompt spaces such as 1-digit chain_sum would otherwise overlap; JSONL rows are
shuffled with the seed and the first `eval_size` held out. Held-out prompts are distinct (a repeat
is dropped; reasoning-gym draws further items until `eval_size` distinct ones are found, if the
prompt space holds that many), so standard errors over prompts count each prompt once.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TaskError(ValueError):
    """A task that cannot be built (unknown name, malformed file, bad verifier)."""


@dataclass
class Example:
    prompt: str
    answer: str
    entry: dict[str, Any] = field(default_factory=dict)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def distinct(examples: list[Example]) -> list[Example]:
    """The examples with their first occurrence of each prompt only (a repeated held-out prompt
    would count twice in a standard error over prompts)."""
    seen: set[str] = set()
    return [e for e in examples if not (e.prompt in seen or seen.add(e.prompt))]


def extract_answer(completion: str) -> str:
    """The final answer of a completion (see the module docstring for the rules)."""
    tagged = re.findall(r"<answer>\s*(.*?)\s*</answer>", completion, flags=re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(completion)
    if numbers:
        return numbers[-1].rstrip(",")
    return completion.strip()


class Task:
    """Train/eval examples plus `score(completion, example) -> float` (may raise; the trainer
    counts such failures and scores them 0)."""

    name: str
    train: list[Example]
    eval: list[Example]

    def score(self, completion: str, example: Example) -> float:
        raise NotImplementedError


class ReasoningGymTask(Task):
    def __init__(self, name: str, params: dict, train_size: int, eval_size: int, seed: int,
                 eval_seed: int):
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        if name not in DATASETS:
            raise TaskError(f"unknown task '{name}': not a .jsonl file and not a reasoning-gym "
                            f"dataset. Valid reasoning-gym names: {', '.join(sorted(DATASETS))}")
        try:
            self._train_ds = reasoning_gym.create_dataset(name, size=train_size, seed=seed, **params)
            self.eval = self._distinct_examples(name, params, eval_size, eval_seed)
        except (TypeError, ValueError, AssertionError) as err:
            raise TaskError(f"task '{name}' rejects task_params {params}: {err}") from None
        self.name = name
        held_out = {ex.prompt for ex in self.eval}
        self.train = [Example(e["question"], str(e["answer"]), e) for e in self._train_ds
                      if e["question"] not in held_out]
        if not self.train:
            raise TaskError(f"task '{name}' with {params}: every training prompt is also a "
                            f"held-out prompt; raise train_size or lower eval_size")

    def score(self, completion: str, example: Example) -> float:
        return self._train_ds.score_answer(extract_answer(completion), example.entry)

    @staticmethod
    def _distinct_examples(name: str, params: dict, size: int, seed: int) -> list[Example]:
        """The first `size` distinct questions of the dataset generated with `seed`, drawing up to
        16·size items (a reasoning-gym item depends on seed and index only, so a longer draw
        extends a shorter one); fewer when the prompt space is that small."""
        import reasoning_gym

        draw = size
        while True:
            items = reasoning_gym.create_dataset(name, size=draw, seed=seed, **params)
            examples = distinct([Example(e["question"], str(e["answer"]), e) for e in items])
            if len(examples) >= size or draw >= 16 * size:
                return examples[:size]
            draw *= 2


def load_function(spec: str, what: str = "verifier") -> Callable[[str, str], float]:
    """The callable `module:function` names; TaskError names `what` it was for and the problem."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TaskError(f"{what} '{spec}' must be 'exact' or 'module:function'" if what == "verifier"
                        else f"{what} '{spec}' must be 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise TaskError(f"{what} '{spec}' cannot be loaded: {err}") from None
    if not callable(fn):
        raise TaskError(f"{what} '{spec}' is not callable")
    return fn


def jsonl_rows(path: Path, error: type[Exception]) -> list[tuple[str, Any]]:
    """(`file:line`, parsed value) of each non-blank line; a line that is not JSON, or a file
    without rows, raises `error` naming where."""
    rows = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise error(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not rows:
        raise error(f"{path}: no rows")
    return rows


def read_jsonl(path: Path) -> list[Example]:
    """Rows with string-able 'prompt' and 'answer'; any malformed line raises naming file:line."""
    examples = []
    for where, row in jsonl_rows(path, TaskError):
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise TaskError(f"{where}: a row needs 'prompt' and 'answer' fields")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise TaskError(f"{where}: 'prompt' must be a non-empty string")
        examples.append(Example(row["prompt"], str(row["answer"]), row))
    return examples


class JsonlTask(Task):
    def __init__(self, path: Path, verifier: str, train_size: int, eval_size: int, seed: int):
        rows = read_jsonl(path)
        if len(rows) < 2:
            raise TaskError(f"{path}: needs at least 2 rows (train and held-out)")
        random.Random(seed).shuffle(rows)
        n_eval = min(eval_size, len(rows) // 2)
        self.name = path.stem
        self.eval = distinct(rows[:n_eval])
        held_out = {e.prompt for e in self.eval}
        self.train = [e for e in rows[n_eval:] if e.prompt not in held_out][:train_size]
        if not self.train:
            raise TaskError(f"{path}: every training row repeats a held-out prompt")
        self._fn = None if verifier == "exact" else load_function(verifier)

    def score(self, completion: str, example: Example) -> float:
        if self._fn is None:
            return float(extract_answer(completion) == example.answer.strip())
        return self._fn(completion, example.answer)


def build_task(cfg) -> Task:
    """The task named by `cfg.task` (a .jsonl path or a reasoning-gym dataset name)."""
    if cfg.task.endswith(".jsonl"):
        path = Path(cfg.task)
        if not path.is_file():
            raise TaskError(f"task file '{cfg.task}' does not exist")
        return JsonlTask(path, cfg.verifier, cfg.train_size, cfg.eval_size, cfg.seed)
    return ReasoningGymTask(cfg.task, cfg.task_params, cfg.train_size, cfg.eval_size, cfg.seed,
                            cfg.eval_seed)


def safe_score(task: Task, completion: str, example: Example) -> tuple[float, bool]:
    """(reward, ok): a verifier that raises or returns a non-number (or NaN/inf) scores 0, ok=False."""
    try:
        value = task.score(completion, example)
    except Exception:  # noqa: BLE001 - a user verifier may fail in any way; training goes on
        return 0.0, False
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value), True
    return 0.0, False


def encode_prompt(tokenizer, prompt: str, system_prompt: str | None) -> list[int]:
    """Token ids of the prompt as a chat turn awaiting the assistant's reply (plain text if the
    tokenizer has no chat template)."""
    if tokenizer.chat_template is None:
        return tokenizer(prompt)["input_ids"]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
