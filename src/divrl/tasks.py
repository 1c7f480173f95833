"""Tasks: prompts with reference answers, and a verifier that scores a completion.

Built in:
- any reasoning-gym dataset by name (+ `create_dataset` params), scored by that dataset's own
  `score_answer` on the extracted final answer;
- a JSONL file with `prompt` and `answer` fields, scored by exact match of the extracted answer
  or by a user function `module:function` called as `f(completion, answer) -> float`.

Final-answer extraction (`extract_answer`) is per task. A task is *numeric* when every reference
answer of both splits is a number (chain_sum, basic_arithmetic, letter_counting, …). Its rule, in
order: the last `<answer>…</answer>` span; else the last `\\boxed{…}`; else the last number in the text
(e.g. "The answer is 7." → "7"); else the whole stripped completion. A non-numeric task
(number_sorting, word_sorting, spell_backward, …) skips the last-number step, so "Sorted: 1, 2, 3"
stays "Sorted: 1, 2, 3" rather than becoming "3"; the prompt of a non-numeric reasoning-gym task
ends with `ANSWER_INSTRUCTION`, asking for the `<answer>` tags the extractor reads (numeric prompts
are the dataset's question unchanged). JSONL prompts are the user's own: a non-numeric JSONL task
scored `exact` should ask for the tags itself.

Bad data is refused up front naming `file:line`: a line that is not UTF-8 (with the byte offset),
not JSON, or without a non-empty string `prompt` and a non-empty string or number `answer`. A prompt
longer than the model's context less `max_new_tokens` is rejected, truncated (its tail kept) or
skipped, per `overlong_prompts` (`fit_to_context`).

The training and held-out splits never share a prompt: the reasoning-gym held-out split is
generated with `eval_seed` and its prompts are removed from the training split (generated with
`seed`) — small prompt spaces such as 1-digit chain_sum would otherwise overlap; JSONL rows are
shuffled with the seed and the first `eval_size` held out. Held-out prompts are distinct (a repeat
is dropped; reasoning-gym draws further items until `eval_size` distinct ones are found, if the
prompt space holds that many), so standard errors over prompts count each prompt once.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import numbers
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any


class TaskError(ValueError):
    """A task that cannot be built (unknown name, malformed file, bad verifier)."""


@dataclass
class Example:
    prompt: str
    answer: str
    entry: dict[str, Any] = field(default_factory=dict)
    task: str | None = None  # the mixture member it came from (`divrl.mixture`); None in a one-task run


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
ANSWER_INSTRUCTION = "Put your final answer between <answer> and </answer> tags."
OVERLONG_POLICIES = ("reject", "truncate", "skip")
logger = logging.getLogger(__name__)


def is_number(answer: str) -> bool:
    """Whether a reference answer is a plain number ("7", "-3", "1,000", "2.5")."""
    return _NUMBER.fullmatch(answer.strip()) is not None


def distinct(examples: list, prompt: Callable[[Any], str] = lambda e: e.prompt) -> list:
    """The examples (or reasoning-gym entries, with `prompt` reading their question) with their
    first occurrence of each prompt only (a repeated held-out prompt would count twice in a
    standard error over prompts)."""
    seen: set[str] = set()
    kept = []
    for e in examples:
        key = prompt(e)
        if key not in seen:
            seen.add(key)
            kept.append(e)
    return kept


def extract_answer(completion: str, numeric: bool = True) -> str:
    """The final answer of a completion; the last number only for a `numeric` task (see the
    module docstring for the rules)."""
    tagged = re.findall(r"<answer>\s*(.*?)\s*</answer>", completion, flags=re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(completion) if numeric else []
    if numbers:
        return numbers[-1].rstrip(",")
    return completion.strip()


class Task:
    """Train/eval examples plus `score(completion, example) -> float` (may raise; the trainer
    counts such failures and scores them 0)."""

    name: str
    train: list[Example]
    eval: list[Example]
    numeric: bool = True  # every reference answer is a number: extraction may fall back to the last number

    def score(self, completion: str, example: Example) -> float:
        raise NotImplementedError

    def final_answer(self, completion: str) -> str:
        """The answer this task's verifier reads in `completion` (`extract_answer`)."""
        return extract_answer(completion, self.numeric)


class ReasoningGymTask(Task):
    def __init__(self, name: str, params: dict, train_size: int, eval_size: int, seed: int, eval_seed: int):
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        if name not in DATASETS:
            raise TaskError(
                f"unknown task '{name}': not a .jsonl file and not a reasoning-gym "
                f"dataset. Valid reasoning-gym names: {', '.join(sorted(DATASETS))}"
            )
        try:
            self._train_ds = reasoning_gym.create_dataset(name, size=train_size, seed=seed, **params)
            train_entries = list(self._train_ds)
            eval_entries = self._distinct_entries(name, params, eval_size, eval_seed)
        except (TypeError, ValueError, AssertionError) as err:
            raise TaskError(f"task '{name}' rejects task_params {params}: {err}") from None
        self.name = name
        self.numeric = all(is_number(str(e["answer"])) for e in train_entries + eval_entries)
        self.eval = [self._example(e) for e in eval_entries]
        held_out = {e["question"] for e in eval_entries}
        self.train = [self._example(e) for e in train_entries if e["question"] not in held_out]
        if not self.train:
            raise TaskError(
                f"task '{name}' with {params}: every training prompt is also a "
                f"held-out prompt; raise train_size or lower eval_size"
            )

    def score(self, completion: str, example: Example) -> float:
        return self._train_ds.score_answer(self.final_answer(completion), example.entry)

    def _example(self, entry: dict) -> Example:
        """The entry's question, followed by `ANSWER_INSTRUCTION` for a non-numeric task."""
        prompt = entry["question"] if self.numeric else f"{entry['question'].rstrip()}\n\n{ANSWER_INSTRUCTION}"
        return Example(prompt, str(entry["answer"]), entry)

    @staticmethod
    def _distinct_entries(name: str, params: dict, size: int, seed: int) -> list[dict]:
        """The first `size` entries with distinct questions of the dataset generated with `seed`,
        drawing up to 16·size items (a reasoning-gym item depends on seed and index only, so a
        longer draw extends a shorter one); fewer when the prompt space is that small."""
        import reasoning_gym

        draw = size
        while True:
            items = reasoning_gym.create_dataset(name, size=draw, seed=seed, **params)
            entries = distinct(list(items), lambda e: e["question"])
            if len(entries) >= size or draw >= 16 * size:
                return entries[:size]
            draw *= 2


def load_function(spec: str, what: str = "verifier") -> Callable[[str, str], float]:
    """The callable `module:function` names; TaskError names `what` it was for and the problem."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TaskError(
            f"{what} '{spec}' must be 'exact' or 'module:function'"
            if what == "verifier"
            else f"{what} '{spec}' must be 'module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise TaskError(f"{what} '{spec}' cannot be loaded: {err}") from None
    if not callable(fn):
        raise TaskError(f"{what} '{spec}' is not callable")
    return fn


def jsonl_rows(path: Path, error: type[Exception]) -> list[tuple[str, Any]]:
    """(`file:line`, parsed value) of each non-blank line; a line that is not UTF-8 (no bytes are
    replaced: a silently altered answer would score wrongly) or not JSON, or a file without rows,
    raises `error` naming where. A UTF-8 byte-order mark at the start is allowed."""
    rows = []
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise error(
                    f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x} at byte "
                    f"{err.start} of the line); re-encode the file as UTF-8, e.g. "
                    f"iconv -f latin1 -t utf-8"
                ) from None
            if line.strip():
                try:
                    rows.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise error(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not rows:
        raise error(f"{path}: no rows")
    return rows


def read_jsonl(path: Path) -> list[Example]:
    """Rows with a non-empty string 'prompt' and a non-empty string or number 'answer'; any
    malformed line raises naming file:line (an empty answer is refused, not skipped: exact match
    would score every completion of it 0, or 1 for an empty one)."""
    examples = []
    for where, row in jsonl_rows(path, TaskError):
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise TaskError(f"{where}: a row needs 'prompt' and 'answer' fields")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise TaskError(f"{where}: 'prompt' must be a non-empty string")
        answer = row["answer"]
        if isinstance(answer, float) and not math.isfinite(answer):
            raise TaskError(f"{where}: 'answer' must be a finite number, got {answer!r}")
        if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
            raise TaskError(f"{where}: 'answer' must be a non-empty string or a number, got {answer!r}")
        examples.append(Example(row["prompt"], number_text(answer) if isinstance(answer, float) else str(answer), row))
    return examples


def number_text(value: float) -> str:
    """A JSON number answer as a model would write it: 1e3 → "1000", 1e21 → 21 digits, 2.50 → "2.5"
    (no exponent, no trailing ".0")."""
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


class JsonlTask(Task):
    def __init__(self, path: Path, verifier: str, train_size: int, eval_size: int, seed: int):
        rows = read_jsonl(path)
        if len(rows) < 2:
            raise TaskError(f"{path}: needs at least 2 rows (train and held-out)")
        random.Random(seed).shuffle(rows)
        n_eval = min(eval_size, len(rows) // 2)
        self.name = path.stem
        self.numeric = all(is_number(e.answer) for e in rows)
        self.eval = distinct(rows[:n_eval])
        held_out = {e.prompt for e in self.eval}
        self.train = [e for e in rows[n_eval:] if e.prompt not in held_out][:train_size]
        if not self.train:
            raise TaskError(f"{path}: every training row repeats a held-out prompt")
        self._fn = None if verifier == "exact" else load_function(verifier)

    def score(self, completion: str, example: Example) -> float:
        if self._fn is None:
            return float(self.final_answer(completion) == example.answer.strip())
        return self._fn(completion, example.answer)


def build_task(cfg) -> Task:
    """The task named by `cfg.task` (a .jsonl path, a reasoning-gym dataset name, or 'mixture':
    the tasks `cfg.mixture` lists, `divrl.mixture`)."""
    if cfg.task == "mixture":
        from divrl.mixture import MixtureTask, parse_mixture

        return MixtureTask(parse_mixture(cfg.task, cfg.mixture), cfg)
    if cfg.task.endswith(".jsonl"):
        path = Path(cfg.task)
        if not path.is_file():
            raise TaskError(f"task file '{cfg.task}' does not exist")
        return JsonlTask(path, cfg.verifier, cfg.train_size, cfg.eval_size, cfg.seed)
    return ReasoningGymTask(cfg.task, cfg.task_params, cfg.train_size, cfg.eval_size, cfg.seed, cfg.eval_seed)


def safe_score(task: Task, completion: str, example: Example) -> tuple[float, bool]:
    """(reward, ok): a verifier that raises (SystemExit included) or returns a non-number, NaN/inf
    or an int too large for a float scores 0, ok=False."""
    try:
        value = task.score(completion, example)
        reward = float(value) if isinstance(value, numbers.Real) else math.nan
    except (Exception, SystemExit):
        return 0.0, False
    return (reward, True) if math.isfinite(reward) else (0.0, False)


_PLAIN_TEXT_TOKENIZERS: set[str] = set()  # tokenizers already warned about, once per process


def encode_prompt(tokenizer, prompt: str, system_prompt: str | None) -> list[int]:
    """Token ids of the prompt as a chat turn awaiting the assistant's reply. A tokenizer without a
    chat template gets plain text instead, "{system_prompt}\\n\\n{prompt}" (just the prompt without
    a system prompt) with the tokenizer's own special tokens (e.g. BOS); a warning says so once per
    tokenizer and process."""
    if tokenizer.chat_template is None:
        if tokenizer.name_or_path not in _PLAIN_TEXT_TOKENIZERS:
            _PLAIN_TEXT_TOKENIZERS.add(tokenizer.name_or_path)
            logger.warning(
                "tokenizer '%s' has no chat template: prompts are sent as plain text "
                "(system_prompt, a blank line, the prompt)",
                tokenizer.name_or_path,
            )
        return tokenizer(f"{system_prompt}\n\n{prompt}" if system_prompt else prompt)["input_ids"]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def truncate_prompt(tokenizer, prompt: str, system_prompt: str | None, limit: int) -> str:
    """The longest tail of `prompt` whose encoded turn (`encode_prompt`) is at most `limit` tokens:
    the question and answer format usually end a prompt, and the chat template's own tokens
    (system turn, generation prompt) are kept whole. TaskError if the template alone is too long."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep, text = len(ids), prompt
    while (excess := len(encode_prompt(tokenizer, text, system_prompt)) - limit) > 0:
        keep -= excess
        if keep <= 0:
            raise TaskError(
                f"config key 'overlong_prompts': even an empty prompt takes more than the "
                f"{limit} tokens the context leaves (chat template and system_prompt); "
                f"lower max_new_tokens or shorten system_prompt"
            )
        text = tokenizer.decode(ids[-keep:])
    return text


def fit_to_context(task: Task, tokenizer, cfg, context: int | None, log=print) -> int:
    """Apply `cfg.overlong_prompts` to the prompts (both splits) longer than `context` −
    `cfg.max_new_tokens` tokens: 'reject' raises TaskError naming the first and how many;
    'truncate' keeps each one's tail (`truncate_prompt`); 'skip' drops them. Returns how many
    there were (logged when any); a model without a context length (`context` None) keeps all."""
    if context is None:
        return 0
    limit = context - cfg.max_new_tokens
    splits = {"training": task.train, "held-out": task.eval}
    long = {
        split: [i for i, e in enumerate(examples) if len(encode_prompt(tokenizer, e.prompt, cfg.system_prompt)) > limit]
        for split, examples in splits.items()
    }
    count = sum(map(len, long.values()))
    if not count:
        return 0
    where = (
        f"{len(long['training'])} of {len(task.train)} training and {len(long['held-out'])} of "
        f"{len(task.eval)} held-out prompts are longer than the {limit} tokens the context leaves "
        f"(max_position_embeddings {context} − max_new_tokens {cfg.max_new_tokens})"
    )
    if cfg.overlong_prompts == "reject":
        split = "training" if long["training"] else "held-out"
        first = splits[split][long[split][0]]
        length = len(encode_prompt(tokenizer, first.prompt, cfg.system_prompt))
        raise TaskError(
            f"{where}; the first, {split} prompt {long[split][0]} ({length} tokens), "
            f"begins {first.prompt[:60]!r}. Set overlong_prompts to 'truncate' or 'skip', "
            f"or lower max_new_tokens"
        )
    for split, examples in splits.items():
        over = set(long[split])
        if cfg.overlong_prompts == "skip":
            examples[:] = [e for i, e in enumerate(examples) if i not in over]
        else:  # two held-out prompts may now share their tail: keep held-out prompts distinct
            examples[:] = [
                dataclasses.replace(e, prompt=truncate_prompt(tokenizer, e.prompt, cfg.system_prompt, limit))
                if i in over
                else e
                for i, e in enumerate(examples)
            ]
            examples[:] = distinct(examples) if split == "held-out" else examples
        if not examples:
            raise TaskError(
                f"{where}: skipping them leaves no {split} prompt; set overlong_prompts "
                f"to 'truncate', or lower max_new_tokens"
            )
    log(f"overlong prompts: {where}; {'skipped' if cfg.overlong_prompts == 'skip' else 'truncated to their tail'}")
    return count
