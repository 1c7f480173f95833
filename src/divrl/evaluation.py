"""Held-out evaluation at large n (`divrl eval`): sample n completions per distinct held-out
prompt with the training rollout code, score them, measure each one teacher-forced (entropy, exact
KL to a reference), and summarize.

Samples are kept as JSONL — a header line (model, task, n, sampling settings) then one line per
completion — so every statistic can be recomputed, for other k, without sampling again
(`summarize`). The statistics (`divrl.metrics` holds the estimators):
- pass@k, unbiased (Chen et al. 2021), for each k, with a percentile-bootstrap interval over prompts;
- mean@n: the mean reward (partial credit included) of all samples;
- maj@k: majority vote over the extracted final answers;
- coverage: the fraction of prompts solved at least once in n samples — the reasoning boundary
  (equal to pass@n);
- diversity per prompt: distinct-1/2/3 over the completions' tokens, the number of distinct final
  answers among correct samples, and of distinct correct completions;
- per-token entropy of the sampling distribution softmax(z/T) (from the logits the sampler drew
  from), and the exact per-token KL(πθ ‖ π_ref) over the whole vocabulary when a reference is
  given (teacher-forced, at the sampling temperature as in training; T = 1 for greedy decoding);
- the mean token log-prob of each sample under the distribution it was drawn from (nucleus-
  renormalized when top_p < 1), best-of-N's default selection score;
- completion length in tokens and the fraction cut at max_new_tokens;
- best-of-N (`metrics.best_of_n`) by a selection score (mean token log-prob, the verifier, or a
  user reward `module:function`), with its KL to the sampler against the bound log N − (N−1)/N.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from divrl import chunked, metrics
from divrl.guarded_verifier import GuardedVerifier
from divrl.hidden import completion_hidden
from divrl.models import output_head, stop_token_ids
from divrl.objectives import PASS_THRESHOLD
from divrl.rollout import sample
from divrl.tasks import Example, Task, TaskError, encode_prompt, jsonl_rows, load_function

FORMAT = "divrl-eval-samples/1"
SELECTIONS = ("mean_logprob", "verifier")


class EvalError(ValueError):
    """Evaluation input that cannot be used (k > n, an empty split, a samples file of another task)."""


def default_ks(n: int) -> list[int]:
    """1, 2, 4, … up to n (n itself included)."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def score_completions(
    verifier: GuardedVerifier, texts: Sequence[str], examples: Sequence[Example], group: int
) -> tuple[list[float], Counter[str]]:
    """Rewards of group-major completions (`group` per example) and the failed verifier calls by
    kind (`error`, `timeout`, `crash`; each scored 0, `divrl.guarded_verifier`). A partial-credit
    reward (reasoning-gym's) is kept as it is; passing is decided elsewhere (full score only)."""
    outcomes = verifier.score([(text, examples[i // group]) for i, text in enumerate(texts)])
    return [reward for reward, _ in outcomes], Counter(kind for _, kind in outcomes if kind)


@torch.no_grad()
def reference_kl(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    temperature: float,
) -> list[float]:
    """Per completion Σ_t KL(π ‖ π_ref)(s_t), exact over the vocabulary at `temperature`, teacher-
    forced (group-major completions, `completion_hidden`)."""
    policy = completion_hidden(model, prompts, completions, pad_token_id)
    target = completion_hidden(reference, prompts, completions, pad_token_id)
    kl = chunked.divergence(
        "reverse_kl",
        policy.hidden,
        output_head(model).at_temperature(temperature),
        target.hidden,
        output_head(reference).at_temperature(temperature),
    )
    return (
        torch.zeros(len(completions), dtype=torch.float64, device=kl.device)
        .index_add_(0, policy.rows, kl.double())
        .tolist()
    )


def sample_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    system_prompt: str | None = None,
    reference: PreTrainedModel | None = None,
    rows_per_batch: int = 256,
    autocast: Callable = nullcontext,
    verifier: GuardedVerifier | None = None,
) -> list[dict]:
    """n samples of every held-out prompt of `task`, scored and measured: one dict per completion
    (the JSONL rows). Prompts go in batches of about `rows_per_batch` completions; one seeded
    generator, so a run is reproducible. `verifier` scores them (default: the task's, in this
    process, with the default time limit)."""
    verifier = verifier or GuardedVerifier(task)
    if not task.eval:
        raise EvalError(f"task '{task.name}' has no held-out prompts (eval_size is 0 or the split is empty)")
    if n < 1:
        raise EvalError(f"n must be at least 1, got {n}")
    generator = torch.Generator().manual_seed(seed)
    stops, pad = stop_token_ids(tokenizer, model), tokenizer.pad_token_id
    per_batch = max(1, rows_per_batch // n)
    rows = []
    bar = tqdm(total=len(task.eval) * n, desc="eval", unit="sample", dynamic_ncols=True)
    for first in range(0, len(task.eval), per_batch):
        examples = task.eval[first : first + per_batch]
        prompt_ids = [encode_prompt(tokenizer, e.prompt, system_prompt) for e in examples]
        with autocast():
            rollout = sample(
                model,
                prompt_ids,
                group_size=n,
                max_new_tokens=max_new_tokens,
                stop_token_ids=stops,
                pad_token_id=pad,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
                with_entropy=True,
            )
            kl = (
                None
                if reference is None
                else reference_kl(model, reference, prompt_ids, rollout.completion_ids, pad, temperature or 1.0)
            )
        assert rollout.entropies is not None  # sampled with_entropy=True
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        rewards, _ = score_completions(verifier, texts, examples, n)
        for i, (ids, text) in enumerate(zip(rollout.completion_ids, texts)):
            example = examples[i // n]
            rows.append(
                {
                    "prompt_id": first + i // n,
                    "prompt": example.prompt,
                    "answer": example.answer,
                    "completion": text,
                    "completion_ids": ids,
                    "reward": rewards[i],
                    "passed": rewards[i] >= PASS_THRESHOLD,
                    "final_answer": task.final_answer(text),
                    "finished": rollout.finished[i],
                    "length": len(ids),
                    "logprob_sum": sum(rollout.logprobs[i]),
                    "entropy_sum": sum(rollout.entropies[i]),
                    "kl_sum": None if kl is None else kl[i],
                }
            )
        bar.update(len(rollout.completion_ids))
    bar.close()
    return rows


# ----- samples file ---------------------------------------------------------------------------


def write_samples(path: Path, header: dict, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps({"format": FORMAT, **header}) + "\n")
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def samples_path(path: str | Path) -> Path:
    """A samples file, or the samples.jsonl of an eval directory."""
    path = Path(path)
    return path / "samples.jsonl" if path.is_dir() else path


HEADER_FIELDS = ("model", "task", "temperature")
_TYPES = {int: "an integer", str: "a string", list: "a list", bool: "true or false", (int, float): "a number"}
ROW_FIELDS: dict[str, type | tuple[type, ...] | None] = {  # what `summarize` reads of a sample: its type (None: any)
    "prompt_id": int,
    "prompt": str,
    "completion": str,
    "completion_ids": list,
    "reward": (int, float),
    "passed": bool,
    "final_answer": None,
    "finished": bool,
    "length": int,
    "logprob_sum": (int, float),
    "entropy_sum": (int, float),
    "kl_sum": None,
}


def read_samples(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, rows) of a samples file written by `write_samples` (or of an eval directory);
    EvalError names what is wrong, and where (file:line)."""
    path = samples_path(path)
    if not path.is_file():
        raise EvalError(f"samples file '{path}' does not exist")
    (where, header), *rows = jsonl_rows(path, EvalError)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise EvalError(f'{where}: not a divrl eval samples file (its first line has no "format": "{FORMAT}")')
    missing = [key for key in HEADER_FIELDS if key not in header]
    if missing:
        raise EvalError(f"{where}: the header lacks {', '.join(missing)}")
    if not rows:
        raise EvalError(f"{path}: holds no samples")
    for where, row in rows:
        if not isinstance(row, dict):
            raise EvalError(f"{where}: a sample must be a JSON object")
        for key, kind in ROW_FIELDS.items():
            if key not in row:
                raise EvalError(f"{where}: the sample lacks '{key}'")
            if kind is not None and not isinstance(row[key], kind):
                raise EvalError(f"{where}: the sample's '{key}' must be {_TYPES[kind]}, got {row[key]!r}")
    return header, [row for _, row in rows]


# ----- statistics -----------------------------------------------------------------------------


def by_prompt(rows: list[dict]) -> list[list[dict]]:
    """The samples grouped by prompt, in prompt order."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["prompt_id"]].append(row)
    return [groups[i] for i in sorted(groups)]


def _interval(values: list[float], seed: int) -> list[float]:
    return list(metrics.bootstrap_ci(values, seed=seed))


def _selection_scores(prompt: list[dict], selection: str) -> list[float]:
    """Best-of-N's score of each sample: its mean token log-prob, its verifier reward, or a user
    reward `module:function` called as f(prompt, completion) -> float."""
    if selection == "mean_logprob":
        return [r["logprob_sum"] / max(r["length"], 1) for r in prompt]
    if selection == "verifier":
        return [r["reward"] for r in prompt]
    try:
        reward = load_function(selection, what="best-of-N reward")
    except TaskError as err:
        raise EvalError(str(err)) from None
    return [float(reward(r["prompt"], r["completion"])) for r in prompt]


def summarize(
    header: dict,
    rows: list[dict],
    ks: Sequence[int] | None = None,
    best_of: Sequence[int] = (),
    selection: str = "mean_logprob",
    seed: int = 0,
) -> dict:
    """Every statistic of the module docstring, as eval.json holds it: `pass@k` (+ `pass@k_ci`, a
    95% bootstrap interval over prompts) for each k, `maj@k`, `mean@n`, `coverage`, the diversity,
    entropy, KL and length means, `best_of_N` results, the header as `meta`, and per prompt the
    prompt text and its number of correct samples (`per_prompt`; `divrl compare` pairs on it)."""
    prompts = by_prompt(rows)
    sizes = {len(p) for p in prompts}
    if len(sizes) != 1:
        raise EvalError(f"every prompt needs the same number of samples; found {sorted(sizes)}")
    n = sizes.pop()
    ks = default_ks(n) if ks is None else sorted(set(ks))
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise EvalError(f"k must lie in 1..n = {n} (n samples per prompt); got k = {bad}")
    passed = [[float(r["passed"]) for r in p] for p in prompts]
    correct = [int(sum(p)) for p in passed]
    out: dict = {"n": n, "prompts": len(prompts), "ks": list(ks)}
    for k in ks:
        values = [metrics.pass_at_k(n, c, k) for c in correct]
        out[f"pass@{k}"] = sum(values) / len(values)
        out[f"pass@{k}_ci"] = _interval(values, seed)
    for k in ks:
        out[f"maj@{k}"] = sum(
            metrics.majority_at_k([r["final_answer"] for r in p], v, k, seed=seed) for p, v in zip(prompts, passed)
        ) / len(prompts)
    mean_reward = [sum(r["reward"] for r in p) / n for p in prompts]
    out["mean@n"] = sum(mean_reward) / len(prompts)
    out["mean@n_ci"] = _interval(mean_reward, seed)
    solved = [float(c > 0) for c in correct]
    out["coverage"] = sum(solved) / len(solved)
    out["coverage_ci"] = _interval(solved, seed)
    for g in (1, 2, 3):
        out[f"distinct_{g}"] = sum(metrics.distinct_n([r["completion_ids"] for r in p], g) for p in prompts) / len(
            prompts
        )
    out["distinct_correct_answers"] = sum(len({r["final_answer"] for r in p if r["passed"]}) for p in prompts) / len(
        prompts
    )
    out["distinct_correct_completions"] = sum(len({r["completion"] for r in p if r["passed"]}) for p in prompts) / len(
        prompts
    )
    tokens = sum(r["length"] for r in rows)
    out["entropy"] = sum(r["entropy_sum"] for r in rows) / max(tokens, 1)
    out["kl"] = None if any(r["kl_sum"] is None for r in rows) else sum(r["kl_sum"] for r in rows) / max(tokens, 1)
    out["length"] = tokens / len(rows)
    out["truncated_fraction"] = sum(not r["finished"] for r in rows) / len(rows)
    if best_of:
        out["best_of"] = _best_of(prompts, passed, best_of, selection, n)
    out["meta"] = {k: v for k, v in header.items() if k != "format"}
    out["per_prompt"] = {"prompt": [p[0]["prompt"] for p in prompts], "correct": correct}
    return out


def _best_of(
    prompts: list[list[dict]], passed: list[list[float]], sizes: Sequence[int], selection: str, n: int
) -> dict:
    if selection not in SELECTIONS and ":" not in selection:
        raise EvalError(
            f"best-of-N selection must be one of {', '.join(SELECTIONS)} or module:function; got '{selection}'"
        )
    bad = [size for size in sizes if not 1 <= size <= n]
    if bad:
        raise EvalError(f"best-of-N needs 1 ≤ N ≤ n = {n}; got N = {bad}")
    result: dict[str, str | dict[str, float]] = {"selection": selection}
    for size in sorted(set(sizes)):
        pairs = [metrics.best_of_n(_selection_scores(p, selection), v, size) for p, v in zip(prompts, passed)]
        result[str(size)] = {
            "accuracy": sum(a for a, _ in pairs) / len(pairs),
            "kl": sum(kl for _, kl in pairs) / len(pairs),
            "kl_bound": math.log(size) - (size - 1) / size,
        }
    return result


# ----- figure ---------------------------------------------------------------------------------


def plot_pass_at_k(evals: Sequence[tuple[str, dict]], path: Path, title: str | None = None) -> None:
    """pass@k against k (log scale) with 95% bootstrap bands, one curve per (label, eval.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    for label, result in evals:
        ks = result["ks"]
        values = [result[f"pass@{k}"] for k in ks]
        low, high = zip(*(result[f"pass@{k}_ci"] for k in ks))
        (line,) = ax.plot(ks, values, marker="o", label=label)
        ax.fill_between(ks, low, high, color=line.get_color(), alpha=0.18)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k (unbiased; band: 95% bootstrap CI over prompts)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
