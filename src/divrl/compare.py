"""`divrl compare RUN_OR_EVAL …`: several runs and evals side by side — pass@k curves (log k, 95%
bootstrap bands), the training trajectories of reward, KL to the reference and entropy, in one
PNG (`compare.png`), and a Markdown table (`compare.md`) of the final numbers with the difference
of each input from the first and its 95% interval.

An input is an eval (a directory with eval.json, or the file), or a run directory: its
metrics.jsonl gives the trajectories and its `eval/eval.json` (written by `divrl eval --model RUN`),
if present, the pass@k curve. Differences of pass@k between two evals are bootstrapped over
prompts, paired when both evaluated the same prompts (`metrics.bootstrap_difference_ci`); a run
without an eval falls back on its last held-out pass@1 and its standard error (normal interval).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from divrl import metrics
from divrl.checkpoint import is_run_dir
from divrl.runlog import read_metrics

TRAJECTORIES = (
    ("reward", "train reward (mean)"),
    ("kl", "KL(πθ ‖ π_ref) per token"),
    ("entropy", "entropy per token (nats)"),
)


class CompareError(ValueError):
    """An input that cannot be compared (missing files, evals of different tasks)."""


@dataclass
class Entry:
    label: str
    path: Path
    eval: dict | None = None  # eval.json
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl of a run

    def per_prompt_pass(self, k: int) -> list[float]:
        if self.eval is None:
            raise CompareError(f"'{self.path}' has no eval.json")
        n = self.eval["n"]
        return [metrics.pass_at_k(n, c, k) for c in self.eval["per_prompt"]["correct"]]

    @property
    def wall_seconds(self) -> float | None:
        times = [r["time_step"] for r in self.rows if "time_step" in r]
        return sum(times) if times else None


def read_eval(path: Path) -> dict:
    """An eval.json written by `divrl eval`; CompareError names the file if it is not one."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CompareError(f"{path}: not JSON ({err})") from None
    if not isinstance(result, dict) or not all(key in result for key in ("per_prompt", "ks", "meta")):
        raise CompareError(f"{path}: not a divrl eval.json (no per_prompt, ks or meta)")
    return result


def load_entry(path: str | Path, label: str | None = None) -> Entry:
    path = Path(path)
    eval_file = path if path.is_file() else path / "eval.json"
    if is_run_dir(path):
        if not (path / "metrics.jsonl").is_file():
            raise CompareError(f"run directory '{path}' has no metrics.jsonl")
        entry = Entry(label or path.name, path, rows=read_metrics(path / "metrics.jsonl", CompareError))
        eval_file = path / "eval" / "eval.json"
        if eval_file.is_file():
            entry.eval = read_eval(eval_file)
        return entry
    if not eval_file.is_file():
        raise CompareError(f"'{path}' is neither a run directory nor an eval (no eval.json)")
    result = read_eval(eval_file)
    folder = eval_file.parent
    default = folder.parent.name if folder.name == "eval" else folder.name  # runs/x/eval → x
    return Entry(label or default, path, eval=result)


def _check_same_task(entries: list[Entry]) -> None:
    tasks = {
        (e.eval["meta"].get("task"), json.dumps(e.eval["meta"].get("task_params"), sort_keys=True))
        for e in entries
        if e.eval is not None
    }
    if len(tasks) > 1:
        raise CompareError("the evals are of different tasks: " + "; ".join(f"{t} {p}" for t, p in sorted(tasks)))


def difference(entry: Entry, base: Entry, k: int) -> tuple[float, tuple[float, float], str] | None:
    """(pass@k of entry − base, 95% interval, how) or None when either lacks it."""
    if entry.eval is not None and base.eval is not None and k in entry.eval["ks"] and k in base.eval["ks"]:
        a, b = entry.per_prompt_pass(k), base.per_prompt_pass(k)
        paired = entry.eval["per_prompt"]["prompt"] == base.eval["per_prompt"]["prompt"]
        low, high = metrics.bootstrap_difference_ci(a, b, paired)
        return sum(a) / len(a) - sum(b) / len(b), (low, high), "paired bootstrap" if paired else "bootstrap"
    if k == 1 and entry.eval is None and base.eval is None:
        last_a, last_b = (next((r for r in reversed(e.rows) if "eval_pass@1" in r), None) for e in (entry, base))
        if last_a is not None and last_b is not None:
            d = last_a["eval_pass@1"] - last_b["eval_pass@1"]
            half = 1.96 * math.hypot(last_a["eval_pass@1_se"], last_b["eval_pass@1_se"])
            return d, (d - half, d + half), "normal (training-time eval)"
    return None


def _cell(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(entries: list[Entry]) -> str:
    """The Markdown table: per input its final numbers, then each input's difference from the first."""
    ks = sorted({k for e in entries if e.eval for k in e.eval["ks"]})
    shown = [k for k in ks if k == 1 or k == ks[-1] or k in (8, 16)] or [1]  # runs only: their pass@1
    lines = [
        "| input | prompts × n | "
        + " | ".join(f"pass@{k}" for k in shown)
        + " | maj@max | coverage | distinct correct answers | entropy | KL to ref | length | wall time |",
        "|---|---|" + "---|" * (len(shown) + 7),
    ]
    for e in entries:
        ev = e.eval
        if ev is not None:
            cells = [
                f"{ev[f'pass@{k}']:.3f} [{ev[f'pass@{k}_ci'][0]:.3f}, {ev[f'pass@{k}_ci'][1]:.3f}]"
                if k in ev["ks"]
                else "—"
                for k in shown
            ]
            row = [
                f"{ev['prompts']} × {ev['n']}",
                *cells,
                _cell(ev.get(f"maj@{ev['n']}")),
                _cell(ev["coverage"]),
                _cell(ev["distinct_correct_answers"], 2),
                _cell(ev["entropy"]),
                _cell(ev["kl"], 4),
                _cell(ev["length"], 1),
            ]
        else:
            last: dict = next((r for r in reversed(e.rows) if "eval_pass@1" in r), {})
            p1 = f"{last['eval_pass@1']:.3f} ± {last['eval_pass@1_se']:.3f}" if last else "—"
            row = [
                f"{last.get('eval_prompts', '—')} × {last.get('eval_samples', '—')}",
                *[p1 if k == 1 else "—" for k in shown],
                *["—"] * 6,
            ]
        wall = e.wall_seconds
        row.append("—" if wall is None else f"{wall / 60:.1f} min (train steps)")
        lines.append(f"| {e.label} | " + " | ".join(row) + " |")
    if len(entries) > 1:
        lines += [
            "",
            f"Differences from **{entries[0].label}** (95% interval):",
            "",
            "| input | k | difference | interval | method |",
            "|---|---|---|---|---|",
        ]
        for e in entries[1:]:
            for k in shown:
                found = difference(e, entries[0], k)
                if found is not None:
                    d, (low, high), how = found
                    lines.append(f"| {e.label} | {k} | {d:+.3f} | [{low:+.3f}, {high:+.3f}] | {how} |")
    return "\n".join(lines) + "\n"


def plot(entries: list[Entry], path: Path) -> None:
    """pass@k curves and the trajectories, one panel each; panels without data say so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {e.label: palette[i % len(palette)] for i, e in enumerate(entries)}  # one per input, every panel
    ax = axes.flat[0]
    for e in entries:
        if e.eval is not None:
            ks = e.eval["ks"]
            ax.plot(ks, [e.eval[f"pass@{k}"] for k in ks], marker="o", label=e.label, color=colour[e.label])
            low, high = zip(*(e.eval[f"pass@{k}_ci"] for k in ks))
            ax.fill_between(ks, low, high, color=colour[e.label], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="k (samples per prompt)", ylabel="pass@k", title="held-out pass@k (95% bootstrap band)", ylim=(0, 1.02)
    )
    for ax, (key, title) in zip(axes.flat[1:], TRAJECTORIES):
        for e in entries:
            points = [(r["step"], r[key]) for r in e.rows if key in r and r[key] is not None]
            if points:
                ax.plot(*zip(*points), label=e.label, color=colour[e.label])
        ax.set(xlabel="training step", ylabel=key, title=title)
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data among the inputs", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="overlay pass@k curves and trajectories of runs/evals; table with CIs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="RUN_OR_EVAL", help="run directories, eval directories or eval.json files"
    )
    parser.add_argument("--labels", help="comma-separated labels, one per input (default: directory names)")
    parser.add_argument("--out", default="compare", help="output directory (default ./compare)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    labels = args.labels.split(",") if args.labels else [None] * len(args.inputs)
    try:
        if len(labels) != len(args.inputs):
            raise CompareError(f"--labels has {len(labels)} labels for {len(args.inputs)} inputs")
        entries = [load_entry(p, label) for p, label in zip(args.inputs, labels)]
        _check_same_task(entries)
    except CompareError as err:
        print(f"divrl: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(entries)
    (out / "compare.md").write_text(text)
    plot(entries, out / "compare.png")
    print(text)
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return 0
