"""Demonstrations: (prompt, completion) pairs for supervised fine-tuning (EKSFT, the behaviour-cloned
reference of demonstration-regularized RL).

A demonstrations file is JSONL, one ``{"prompt": ..., "completion": ...}`` object per line; a bad
line is refused with its file:line. When a recipe needs demonstrations and no file is given they
are built, and the log says which:

- ``answers``: from the task's reference answers, the completion
  "The answer is <answer>{answer}</answer>." (the tags come first in every task's answer
  extraction, `tasks.extract_answer`, numeric or not);
- ``teacher``: from the teacher's own samples, the first of `stored_samples` that passes the
  verifier per training prompt (rejection sampling); prompts it never solves get none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from divrl.tasks import jsonl_rows


class DemoError(ValueError):
    """A demonstrations file that cannot be read."""


@dataclass(frozen=True)
class Demo:
    prompt: str
    completion: str


SOURCES = ("answers", "teacher")


def read(path: str | Path) -> list[Demo]:
    """The demonstrations of a JSONL file; DemoError names the file and line of a bad row."""
    path = Path(path)
    if not path.is_file():
        raise DemoError(f"demonstrations file '{path}' does not exist")
    demos = []
    for where, row in jsonl_rows(path, DemoError):
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) and row[k].strip() for k in ("prompt", "completion")
        ):
            raise DemoError(f"{where}: a row needs non-empty string 'prompt' and 'completion' fields")
        demos.append(Demo(row["prompt"], row["completion"]))
    return demos


def from_answers(examples) -> list[Demo]:
    """One demonstration per example: "The answer is <answer>{answer}</answer>."."""
    return [Demo(e.prompt, f"The answer is <answer>{e.answer}</answer>.") for e in examples]
