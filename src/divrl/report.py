"""End-of-run outputs: `curves.png` (reward, held-out pass@1, KL to reference, entropy vs step) and
`report.md` (held-out pass@1 and pass@k before vs after, with n and standard errors; a mixture's
pass@1 per task too)."""

from __future__ import annotations

from pathlib import Path

from divrl.runlog import read_metrics


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward", "train reward (mean)"),
        ("eval_pass@1", "held-out pass@1"),
        ("kl", "KL(πθ ‖ π_ref) per token"),
        ("entropy", "entropy per token (nats)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, panels):
        points = [(r["step"], r[key], r.get(f"{key}_se")) for r in rows if key in r]
        if points:
            steps, values, errors = zip(*points)
            if all(e is not None for e in errors):
                ax.errorbar(steps, values, yerr=errors, marker="o", capsize=3)
            else:
                ax.plot(steps, values, marker="." if len(points) < 60 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _eval_table(before: dict, after: dict) -> list[str]:
    n = before["eval_samples"]
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for key, se in [
        ("eval_pass@1", "eval_pass@1_se"),
        (f"eval_pass@{n}", f"eval_pass@{n}_se"),
        *((k, k.replace("@1/", "@1_se/")) for k in before if k.startswith("eval_pass@1/")),  # a mixture's tasks
    ]:
        b, a = before[key], after[key]
        lines.append(
            f"| {key.removeprefix('eval_')} | {b:.3f} ± {before[se]:.3f} | {a:.3f} ± {after[se]:.3f} | {a - b:+.3f} |"
        )
    return lines


def write_report(run_dir: Path, cfg, summary: dict) -> None:
    rows = read_metrics(run_dir / "metrics.jsonl")
    plot_curves(rows, run_dir / "curves.png")
    before, after = summary["before"], summary["after"]
    train_rows = [r for r in rows if "reward" in r]
    step_times = [r["time_step"] for r in train_rows]
    lines = [
        f"# divrl run: {cfg.model} on {cfg.task}",
        "",
        f"{cfg.steps} steps × {cfg.prompts_per_step} prompts × {cfg.group_size} samples, "
        f"≤ {cfg.max_new_tokens} new tokens, T = {cfg.temperature}, lr {cfg.lr}.",
        "",
        f"Objective: {cfg.objective.describe()}.",
        "",
        "## Held-out evaluation",
        "",
        f"{before['eval_prompts']} held-out prompts × {before['eval_samples']} samples each at "
        f"T = {cfg.eval_temperature}; ± is the standard error over prompts; pass@k is the unbiased "
        f"estimator 1 − C(n−c,k)/C(n,k).",
        "",
        *_eval_table(before, after),
        "",
        "## Training",
        "",
        f"- wall time (evaluations included): {summary['train_seconds'] / 60:.1f} min",
    ]
    if step_times:
        lines.append(f"- seconds per step: {sum(step_times) / len(step_times):.1f} (mean)")
        span = min(5, len(train_rows))
        first = sum(r["reward"] for r in train_rows[:span]) / span
        last = sum(r["reward"] for r in train_rows[-span:]) / span
        lines.append(f"- mean train reward: {first:.3f} (first {span} steps) → {last:.3f} (last {span} steps)")
        lines.append(f"- verifier failures scored 0: {train_rows[-1]['reward_errors_total']}")
    lines += ["", "![curves](curves.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
