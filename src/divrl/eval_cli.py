"""`divrl eval`: pass@k to large k, majority vote, coverage, diversity, entropy, KL to a reference
and best-of-N of a model or a run on its task's held-out prompts (`divrl.evaluation`).

The task and the sampling settings come from --config, else from the run's saved config when
--model is a run directory (its latest checkpoint is evaluated); the flags override them; sampling
uses eval_temperature, top_p, max_new_tokens, system_prompt and dtype of that config. Writes to
--out: eval.json, samples.jsonl (recompute later with --samples, no sampling) and pass_at_k.png.
With --samples the output goes next to the samples (DIR for DIR/samples.jsonl, DIR/x for a file
DIR/x.jsonl), and samples.jsonl is copied there unless it is already: an --out holding other
samples is refused, never overwritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from divrl.checkpoint import is_run_dir, resolve_model


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if min(values) < 1:  # refused here, before any sampling (k and N count samples)
        raise argparse.ArgumentTypeError(f"expected integers ≥ 1, got '{text}'")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="pass@k to large k, diversity, KL and best-of-N on held-out prompts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", help="model directory, 'default', 'tiny', or a run directory (its latest checkpoint)"
    )
    source.add_argument(
        "--samples",
        metavar="FILE_OR_DIR",
        help="recompute the statistics of an earlier eval's samples.jsonl without sampling",
    )
    parser.add_argument("--config", help="a divrl train config whose task and sampling keys to use")
    parser.add_argument("--task", help="reasoning-gym dataset name or .jsonl file (config key task)")
    parser.add_argument("--task-params", metavar="YAML", help="task_params as a YAML/JSON mapping")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other config key, e.g. eval_size=128 or max_new_tokens=64",
    )
    parser.add_argument("--n", type=int, default=64, help="samples per held-out prompt (default 64)")
    parser.add_argument("--k", type=_ints, metavar="K,K,…", help="the k of pass@k and maj@k (default 1,2,4,…,n)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: config eval_temperature)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--reference", help="model (or run directory) for the exact per-token KL(πθ ‖ π_ref)")
    parser.add_argument("--best-of", type=_ints, metavar="N,N,…", help="best-of-N accuracy and KL for these N")
    parser.add_argument(
        "--select",
        default="mean_logprob",
        metavar="mean_logprob|verifier|MODULE:FUNCTION",
        help="best-of-N picks the sample with the highest mean token log-prob "
        "(default), verifier reward, or user reward f(prompt, completion) -> float",
    )
    parser.add_argument(
        "--out",
        help="output directory (default: RUN/eval for a run, else ./eval; with --samples, the eval's "
        "directory, or DIR/x for a file DIR/x.jsonl); --samples refuses an --out that holds other samples",
    )
    parser.set_defaults(func=run)
    return parser


def _config(args: argparse.Namespace):
    """The config whose task and sampling keys the eval uses: --config, else the run's saved
    config when --model is a run directory, else the defaults; the flags and --set override it."""
    from divrl.config import build_config

    overrides = list(args.set)
    if args.task is not None:
        overrides.append(f"task={args.task}")
    if args.task_params is not None:
        overrides.append(f"task_params={args.task_params}")
    path = args.config
    if path is None and args.model and is_run_dir(args.model) and (Path(args.model) / "config.yaml").is_file():
        path = Path(args.model) / "config.yaml"
    return build_config(path, overrides)


def _sampled(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """(header, rows) of a fresh sampling run."""
    from divrl import evaluation, precision
    from divrl.guarded_verifier import GuardedVerifier
    from divrl.models import autocast_for, context_length, load_model, resolve_device
    from divrl.tasks import build_task, fit_to_context

    if args.n < 1:
        raise evaluation.EvalError(f"--n must be at least 1, got {args.n}")
    too_big = [k for k in (args.k or []) + (args.best_of or []) if k > args.n]
    if too_big:
        raise evaluation.EvalError(f"k and N cannot exceed n = {args.n} samples per prompt; got {too_big}")
    cfg = _config(args)
    task = build_task(cfg)
    source = resolve_model(args.model)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(source, seed=cfg.seed, device=device)
    fit_to_context(task, tokenizer, cfg, context_length(model))  # overlong_prompts, as in training
    model.eval().requires_grad_(False)
    reference = None
    if args.reference is not None:
        reference, _ = load_model(resolve_model(args.reference), seed=cfg.seed, device=device)
        reference.eval().requires_grad_(False)
    temperature = cfg.eval_temperature if args.temperature is None else args.temperature
    print(
        f"evaluating {source} on {task.name}: {len(task.eval)} distinct held-out prompts × {args.n} "
        f"samples, T = {temperature}",
        flush=True,
    )
    rows = evaluation.sample_eval(
        model,
        tokenizer,
        task,
        n=args.n,
        temperature=temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        seed=args.seed,
        system_prompt=cfg.system_prompt,
        reference=reference,
        autocast=autocast_for(precision.resolve(cfg.dtype, model, print), device),
        verifier=GuardedVerifier.from_config(task, cfg),
    )
    header = {
        "model": source,
        "task": task.name,
        "task_params": cfg.task_params,
        "eval_seed": cfg.eval_seed,
        "n": args.n,
        "temperature": temperature,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": args.seed,
        "reference": args.reference,
        "prompts": len(task.eval),
    }
    return header, rows


def _default_out(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    if args.samples is not None:
        samples = Path(args.samples)
        if samples.is_dir() or samples.name == "samples.jsonl":
            return samples if samples.is_dir() else samples.parent
        return samples.with_suffix("")  # DIR/x.jsonl → DIR/x: DIR/samples.jsonl is another eval's
    return Path(args.model) / "eval" if is_run_dir(args.model) else Path("eval")


def _write_samples(args: argparse.Namespace, target: Path, header: dict, rows: list[dict]) -> bool:
    """Whether to write the samples to `target`: always fresh ones; with --samples only where
    `target` does not exist (it may be the input, or a copy of it). Other samples there are never
    overwritten: EvalError."""
    from divrl import evaluation

    if args.samples is None or not target.exists():
        return True
    if target.resolve() != evaluation.samples_path(args.samples).resolve():
        try:
            same = evaluation.read_samples(target) == (header, rows)
        except evaluation.EvalError:
            same = False
        if not same:
            raise evaluation.EvalError(f"{target} holds other samples than {args.samples}; choose another --out")
    return False


def _print_summary(result: dict) -> None:
    ks = result["ks"]
    print(f"{result['prompts']} prompts × {result['n']} samples")
    for k in ks:
        low, high = result[f"pass@{k}_ci"]
        print(f"  pass@{k:<4} {result[f'pass@{k}']:.3f}  [{low:.3f}, {high:.3f}]   maj@{k:<4} {result[f'maj@{k}']:.3f}")
    kl = "—" if result["kl"] is None else f"{result['kl']:.4f}"
    print(
        f"  mean@n {result['mean@n']:.3f}  coverage {result['coverage']:.3f}  distinct-2 {result['distinct_2']:.3f}  "
        f"distinct correct answers {result['distinct_correct_answers']:.2f}  entropy {result['entropy']:.3f}  "
        f"KL {kl}  length {result['length']:.1f}"
    )
    for size, bon in result.get("best_of", {}).items():
        if size != "selection":
            print(
                f"  best-of-{size} ({result['best_of']['selection']}): accuracy {bon['accuracy']:.3f}, "
                f"KL to sampler {bon['kl']:.3f} (bound log N − (N−1)/N = {bon['kl_bound']:.3f})"
            )


def run(args: argparse.Namespace) -> int:
    from divrl import evaluation
    from divrl.config import ConfigError
    from divrl.models import ModelLoadError
    from divrl.tasks import TaskError

    try:
        if args.samples is not None:
            header, rows = evaluation.read_samples(Path(args.samples))
            if args.task is not None and Path(args.task).stem != header["task"] and args.task != header["task"]:
                raise evaluation.EvalError(
                    f"{args.samples} holds samples of task '{header['task']}', not '{args.task}'"
                )
        else:
            header, rows = _sampled(args)
        result = evaluation.summarize(header, rows, args.k, args.best_of or (), args.select, seed=args.seed)
        out = _default_out(args)
        write = _write_samples(args, out / "samples.jsonl", header, rows)
    except (evaluation.EvalError, ConfigError, TaskError, ModelLoadError, FileNotFoundError) as err:
        print(f"divrl: error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if write:
        evaluation.write_samples(out / "samples.jsonl", header, rows)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    evaluation.plot_pass_at_k(
        [(Path(str(header["model"])).name or str(header["model"]), result)],
        out / "pass_at_k.png",
        title=f"{header['task']}: n = {result['n']}, T = {header['temperature']}",
    )
    _print_summary(result)
    print(f"wrote {out / 'eval.json'}, {out / 'samples.jsonl'} and {out / 'pass_at_k.png'}")
    return 0
