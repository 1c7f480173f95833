"""`divrl analyze --base BASE CHECKPOINT… --out DIR`: what RL did to the weights (formulas and
sources: divrl.weight_analysis).

BASE and each CHECKPOINT are Hugging Face model directories (*.safetensors weights) or divrl run
directories; BASE may also be 'default', the embedded default model. The latest CHECKPOINT (by
step; a run directory stands for its latest checkpoint) is compared with BASE: update sparsity per
tensor, per layer and overall, and the spectral drift of every 2-D weight matrix. With two or more
checkpoints (a run directory contributes every checkpoints/step-N it keeps) RELEX fits a rank-1
linear trajectory per tensor, and --extrapolate-to STEP writes the extrapolated model, loadable by
from_pretrained, to DIR/extrapolated-step-STEP/. A checkpoint's step is read from its
trainer_state.json ("step", or an HF Trainer's "global_step"), else from a step-N or checkpoint-N
directory name. Writes DIR/analysis.json, sparsity.png,
spectrum.png and (with RELEX) relex.png.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
from pathlib import Path

import torch

from divrl import weight_analysis as wa

_STEP_DIR = re.compile(r"^(?:step|checkpoint)-(\d+)$")
TIED_HEAD = "lm_head.weight"  # omitted by save_pretrained when tied to the input embedding
_NOT_COPIED = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "trainer_state.json", "manifest.json")
_COMPARE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_RELEX_PLOTTED = 6


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `analyze` subcommand on an argparse subparsers object; its handler is `run`."""
    parser = subparsers.add_parser(
        "analyze",
        help="what RL did to the weights: update sparsity, spectral drift, RELEX extrapolation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="model directory or run directory (all its checkpoints for RELEX)",
    )
    parser.add_argument("--base", required=True, help="the model RL started from: model or run directory, or 'default'")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    parser.add_argument(
        "--top-k", type=int, default=16, metavar="K", help="singular values / vectors compared per matrix (default 16)"
    )
    parser.add_argument(
        "--extrapolate-to",
        type=int,
        metavar="STEP",
        help="write the RELEX-extrapolated model at this step (needs >= 2 checkpoints)",
    )
    parser.add_argument(
        "--window",
        type=int,
        metavar="N",
        help="fit the RELEX line on the N latest checkpoints (default all; u always uses all)",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        help="relative tolerance of 'unchanged' (default: unit roundoff eps/2 of the stored dtype)",
    )
    parser.add_argument(
        "--atol", type=float, help="absolute tolerance of 'unchanged' (default: half the dtype's smallest subnormal)"
    )
    parser.add_argument(
        "--compare-dtype",
        choices=sorted(_COMPARE_DTYPES),
        help="round both weights to this dtype before comparing (the sparsity paper: "
        "--compare-dtype bfloat16 --rtol 0 --atol 1e-5)",
    )
    parser.add_argument(
        "--svd",
        choices=["auto", "full", "randomized"],
        default="auto",
        help="SVD of the spectral metrics (default auto: full up to m·n·min(m,n) = 2^35)",
    )
    parser.set_defaults(func=run)
    return parser


class _Weights:
    """The tensors of a model directory's *.safetensors files, read one at a time."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"'{path}' has no *.safetensors weights (a Hugging Face save_pretrained directory)")
        self.path = path
        self._files = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as err:  # safetensors raises its own error type for a bad header
                raise ValueError(f"cannot read '{file}': {err}") from None
            self._files.update(dict.fromkeys(handle.keys(), handle))

    def names(self) -> set[str]:
        return set(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._files[name].get_slice(name).get_shape())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._files[name].get_tensor(name)


def _model_dir(spec: str) -> Path:
    """A model directory for `spec`: itself, the latest checkpoint of a run directory, or the
    default model's cache for 'default'."""
    from divrl.checkpoint import resolve_model

    if spec == "default":
        from divrl.models import default_model_dir

        return default_model_dir()
    path = Path(resolve_model(spec))
    if not path.is_dir():
        raise ValueError(f"'{spec}' is not a directory (a model or run directory)")
    if not (path / "config.json").is_file():
        raise ValueError(f"'{path}' has no config.json; it is not a Hugging Face model directory")
    return path


def _step(path: Path) -> int | None:
    """The step of a checkpoint directory: trainer_state.json's "step" (divrl) or "global_step"
    (HF Trainer), else a step-N (divrl) or checkpoint-N (HF Trainer) name."""
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            fields = json.loads(state.read_text())
            return int(fields["step"] if "step" in fields else fields["global_step"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f'{state} has no integer "step" or "global_step" ({err})') from None
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def _checkpoints(specs: list[str]) -> list[Path]:
    """The checkpoint directories given: a run directory contributes all of its checkpoints."""
    from divrl.checkpoint import checkpoint_dirs, is_run_dir

    found: list[Path] = []
    for spec in specs:
        paths = [_model_dir(spec)]  # raises naming a run directory without checkpoints
        if is_run_dir(spec):
            paths = [p for _, p in checkpoint_dirs(Path(spec))]
        found += [p for p in paths if p.resolve() not in {q.resolve() for q in found}]
    return found


def _window(paths: list[Path]) -> tuple[list[Path], list[int | None]]:
    """Checkpoints sorted by step, and their steps (required when there are several)."""
    steps = [_step(p) for p in paths]
    if len(paths) == 1:
        return paths, steps
    missing = [str(p) for p, s in zip(paths, steps) if s is None]
    if missing:
        raise ValueError(
            f"cannot tell the training step of {', '.join(missing)}: give it a trainer_state.json "
            f'with {{"step": N}} or name its directory step-N'
        )
    known = [s for s in steps if s is not None]  # all of them: none is missing
    order = sorted(range(len(paths)), key=lambda i: known[i])
    paths, known = [paths[i] for i in order], [known[i] for i in order]
    repeated = sorted({s for s in known if known.count(s) > 1})
    if repeated:
        raise ValueError(f"several checkpoints have step {repeated[0]}")
    return paths, [*known]


def _tied(model_dir: Path) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    return bool(getattr(config, "tie_word_embeddings", False))


def _tensor_names(base: _Weights, others: list[_Weights], tied: bool) -> list[str]:
    """Names to analyze (less a tied output head), embeddings first, then by layer; raises
    ValueError naming the first tensor that is missing on one side or differs in shape."""
    skip = {TIED_HEAD} if tied else set()
    names = [n for n in base.names() if n not in skip]
    for other in others:
        for name in sorted((base.names() ^ other.names()) - skip):
            where, not_where = (base, other) if name in base.names() else (other, base)
            raise ValueError(
                f"checkpoint '{other.path}' does not match base '{base.path}': tensor '{name}' "
                f"is in '{where.path}' but not in '{not_where.path}'"
            )
        for name in sorted(names):
            if base.shape(name) != other.shape(name):
                raise ValueError(
                    f"checkpoint '{other.path}' does not match base '{base.path}': tensor '{name}' "
                    f"has shape {other.shape(name)} there and {base.shape(name)} in the base"
                )
    return sorted(names, key=lambda n: (wa.layer_of(n) is not None, wa.layer_of(n) or 0, n))


def _finite(value):
    """JSON-able: NaN / ±inf → None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _sparsity_entry(counts: wa.Sparsity) -> dict:
    return {"unchanged": counts.unchanged, "total": counts.total, "fraction_unchanged": counts.fraction}


def _analyze(
    args, base: _Weights, window: list[_Weights], steps: list[int | None], fit_window: int, names: list[str]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """One pass over the tensors, comparing the latest of `window` with `base` and (with 2 or more)
    fitting RELEX on `window`: (analysis dict, extrapolated tensors in the latest's dtypes)."""
    from tqdm.auto import tqdm

    compare = _COMPARE_DTYPES.get(args.compare_dtype)
    relex = len(window) >= 2
    relex_steps = [s for s in steps if s is not None]  # all of them with 2 or more checkpoints (_window)
    sparsity, spectra, trajectories, extrapolated = {}, {}, {}, {}
    for name in tqdm(names, desc="analyze", unit="tensor", file=sys.stderr):
        w0, w1 = base[name], window[-1][name]
        counts, rtol, atol = wa.tensor_sparsity(w0, w1, args.rtol, args.atol, compare)
        sparsity[name] = (counts, rtol, atol)
        if w0.ndim == 2:
            spectra[name] = {
                "layer": wa.layer_of(name),
                "shape": list(w0.shape),
                **wa.spectral_drift(w0, w1, args.top_k, args.svd),
            }
        if relex:
            fit = wa.relex_fit(w0, [w[name] for w in window], relex_steps, fit_window)
            trajectories[name] = {
                "energy_rank1": fit.trajectory.energy,
                "delta_energy": fit.trajectory.delta_energy,
                "coefficients": fit.trajectory.coefficients.tolist(),
                "alpha": fit.line.alpha,
                "beta": fit.line.beta,
                "r2": fit.line.r2,
            }
            if args.extrapolate_to is not None:
                trajectories[name]["a_target"] = fit.line(args.extrapolate_to)
                extrapolated[name] = fit.at(w0, args.extrapolate_to).to(w1.dtype)
    overall, layers = wa.group_by_layer({n: c for n, (c, _, _) in sparsity.items()})
    analysis = {
        "sparsity": {
            "rule": "unchanged iff |w' - w| <= max(atol, rtol * min(|w|, |w'|))",
            "compare_dtype": args.compare_dtype,
            "overall": _sparsity_entry(overall),
            "per_layer": {layer: _sparsity_entry(c) for layer, c in layers.items()},
            "per_tensor": {n: {**_sparsity_entry(c), "rtol": r, "atol": a} for n, (c, r, a) in sparsity.items()},
        },
        "spectral": {"top_k": args.top_k, "full_svd_max_work": wa.FULL_SVD_MAX_WORK, "matrices": spectra},
    }
    if relex:
        analysis["relex"] = _relex_summary(args.extrapolate_to, relex_steps, relex_steps[-fit_window:], trajectories)
    return analysis, extrapolated


def _relex_summary(target: int | None, steps: list[int], fit_steps: list[int], per_tensor: dict) -> dict:
    energies = [t["energy_rank1"] for t in per_tensor.values() if t["energy_rank1"] is not None]
    r2s = [t["r2"] for t in per_tensor.values() if t["r2"] is not None]
    explained = sum((t["energy_rank1"] or 0.0) * t["delta_energy"] for t in per_tensor.values())
    total = sum(t["delta_energy"] for t in per_tensor.values())
    return {
        "method": "per tensor: u = top right-singular vector of D (rows d_s = theta_s - theta_0), "
        "a_s = d_s . u, a(t) = alpha + beta t least squares on fit_steps, theta(T) = theta_0 + a(T) u",
        "steps": steps,
        "fit_steps": fit_steps,
        "target_step": target,
        "energy_rank1_overall": explained / total if total else None,
        "energy_rank1_median": statistics.median(energies) if energies else None,
        "r2_median": statistics.median(r2s) if r2s else None,
        "note": "with 2 fit steps the line is exact: R² = 1 by construction" if len(fit_steps) == 2 else None,
        "per_tensor": per_tensor,
    }


def _write_extrapolated(target: Path, latest: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A from_pretrained-loadable directory: the latest checkpoint's config, generation config and
    tokenizer files, and `tensors` as model.safetensors (a tied head is re-tied on load)."""
    from safetensors.torch import save_file

    from divrl.atomic import save_atomically

    def save(tmp: Path) -> None:
        for file in latest.iterdir():
            if file.is_file() and not any(file.match(pattern) for pattern in _NOT_COPIED):
                shutil.copy2(file, tmp / file.name)
        save_file(
            {n: t.contiguous() for n, t in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )

    save_atomically(target, save)


def _plot_sparsity(path: Path, analysis: dict) -> None:
    from matplotlib.figure import Figure

    per_layer = analysis["sparsity"]["per_layer"]
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(list(per_layer), [e["fraction_unchanged"] for e in per_layer.values()], color="tab:blue")
    overall = analysis["sparsity"]["overall"]["fraction_unchanged"]
    ax.axhline(overall, color="black", ls="--", lw=1, label=f"overall {overall:.1%}")
    ax.set_xlabel("transformer layer")
    ax.set_ylabel("fraction of parameters unchanged")
    ax.set_ylim(0, 1)
    ax.set_title("Update sparsity per layer")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)


def _plot_spectrum(path: Path, analysis: dict) -> None:
    from matplotlib.figure import Figure

    kinds: dict[str, list[tuple[int, dict]]] = {}
    for name, entry in analysis["spectral"]["matrices"].items():
        if entry["layer"] is not None:
            kind = name.split(f"layers.{entry['layer']}.", 1)[1].removesuffix(".weight")
            kinds.setdefault(kind, []).append((entry["layer"], entry))
    panels = [
        ("sigma_rel_change_max", f"max over top-{analysis['spectral']['top_k']} of |Δσ|/σ", True),
        ("rotation_left_deg", "top-k left subspace rotation [degrees]", True),
        ("alignment", "‖U_kᵀ ΔW V_k‖_F / ‖ΔW‖_F", False),
    ]
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    for i, (key, label, log) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for kind, points in sorted(kinds.items()):
            points.sort(key=lambda p: p[0])
            values = [e[key] if e[key] is not None and (e[key] > 0 or not log) else math.nan for _, e in points]
            ax.plot([layer for layer, _ in points], values, marker=".", lw=1, label=kind)
        if log and any(e[key] for points in kinds.values() for _, e in points):
            ax.set_yscale("log")
        ax.set_xlabel("transformer layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("Spectral drift of each layer's weight matrices (base → checkpoint)")
    fig.savefig(path, dpi=120)


def _plot_relex(path: Path, relex: dict) -> None:
    from matplotlib.figure import Figure

    steps, target, per_tensor = relex["steps"], relex["target_step"], relex["per_tensor"]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    largest = sorted(per_tensor, key=lambda n: -per_tensor[n]["delta_energy"])[:_RELEX_PLOTTED]
    end = target if target is not None else steps[-1]
    span = [min(steps[0], end), max(steps[-1], end)]
    for name in largest:
        entry = per_tensor[name]
        scale = abs(entry["coefficients"][-1]) or 1.0
        (line,) = ax.plot(steps, [a / scale for a in entry["coefficients"]], "o", ms=4, label=name)
        ax.plot(span, [(entry["alpha"] + entry["beta"] * t) / scale for t in span], "-", lw=1, color=line.get_color())
        if target is not None:
            ax.plot([target], [entry["a_target"] / scale], "*", ms=11, color=line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("coefficient $a_s = d_s \\cdot u$ / |a at last checkpoint|")
    ax.set_title("RELEX: rank-1 coefficients, linear fit" + (f", ★ step {target}" if target is not None else ""))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    energy, r2 = (
        [math.nan if e[key] is None else e[key] for e in per_tensor.values()] for key in ("energy_rank1", "r2")
    )
    ax.scatter(energy, r2, s=8)
    ax.set_xlabel("energy fraction of the rank-1 direction $\\sigma_1^2 / \\|D\\|_F^2$")
    ax.set_ylabel("$R^2$ of the linear fit")
    ax.ticklabel_format(useOffset=False)
    ax.set_xlim(0, 1.02)
    ax.set_title("per tensor")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _summary(args, analysis: dict, base: Path, latest: Path, step: int | None, written: Path | None) -> str:
    sparsity = analysis["sparsity"]
    overall, per_layer = sparsity["overall"], sparsity["per_layer"]
    lines = [
        f"base {base}\ncheckpoint {latest}" + (f" (step {step})" if step is not None else ""),
        f"update sparsity: {overall['fraction_unchanged']:.2%} of {overall['total']:,} parameters unchanged",
    ]
    if per_layer:
        fractions = {layer: e["fraction_unchanged"] for layer, e in per_layer.items()}
        low, high = min(fractions, key=fractions.__getitem__), max(fractions, key=fractions.__getitem__)
        lines.append(f"  per layer {fractions[low]:.2%} (layer {low}) to {fractions[high]:.2%} (layer {high})")
    matrices = list(analysis["spectral"]["matrices"].values())
    if matrices:
        methods = {m: sum(e["method"] == m for e in matrices) for m in ("full", "randomized")}

        def median(key):
            values = [e[key] for e in matrices if e[key] is not None]
            return statistics.median(values) if values else math.nan

        lines.append(
            f"spectral drift (top-{args.top_k}, {len(matrices)} matrices: {methods['full']} full SVD, "
            f"{methods['randomized']} randomized), medians: "
            f"max |Δσ|/σ {median('sigma_rel_change_max'):.3g}, "
            f"rotation {median('rotation_left_deg'):.3g}° (left) {median('rotation_right_deg'):.3g}° "
            f"(right), alignment {median('alignment'):.3g}, rank(ΔW)/min(m,n) "
            f"{median('delta_rank_fraction'):.3g}"
        )
    if "relex" in analysis:
        relex = analysis["relex"]
        lines.append(
            f"RELEX over steps {relex['steps']} (line on {relex['fit_steps']}): rank-1 energy "
            f"{_fmt(relex['energy_rank1_overall'])} overall, median {_fmt(relex['energy_rank1_median'])}; "
            f"median R² {_fmt(relex['r2_median'])}"
        )
        if written is not None:
            lines.append(f"  extrapolated to step {args.extrapolate_to}: {written}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Handler of `divrl analyze`: compare, print a summary, write DIR/analysis.json and PNGs."""
    from divrl.models import ModelLoadError

    out = Path(args.out)
    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
        if args.window is not None and args.window < 2:
            raise ValueError(f"--window must be >= 2 (a line needs two points), got {args.window}")
        if (args.rtol is not None and args.rtol < 0) or (args.atol is not None and args.atol < 0):
            raise ValueError("--rtol and --atol must be >= 0")
        base_dir = _model_dir(args.base)
        paths = _checkpoints(args.checkpoints)
        if args.extrapolate_to is not None and len(paths) < 2:
            raise ValueError(
                f"RELEX (--extrapolate-to) needs at least 2 checkpoints, got 1: {paths[0]}; "
                f"pass several, or a run directory that keeps several"
            )
        paths, steps = _window(paths)
        base = _Weights(base_dir)
        window = [_Weights(p) for p in paths]
        tied = _tied(base_dir)
        names = _tensor_names(base, window, tied)
    except (ValueError, FileNotFoundError, ModelLoadError) as err:
        print(f"divrl: error: {err}", file=sys.stderr)
        return 2
    fit_window = min(args.window or len(paths), len(paths))
    analysis, extrapolated = _analyze(args, base, window, steps, fit_window, names)
    skipped = [TIED_HEAD] if tied and TIED_HEAD in base.names() | window[-1].names() else []
    analysis = {
        "base": str(base_dir),
        "checkpoint": str(paths[-1]),
        "checkpoint_step": steps[-1],
        "skipped_tied_tensors": skipped,
        **analysis,
    }
    out.mkdir(parents=True, exist_ok=True)
    written = None
    if extrapolated:
        written = out / f"extrapolated-step-{args.extrapolate_to}"
        _write_extrapolated(written, paths[-1], extrapolated)
        analysis["relex"]["output_dir"] = str(written)
    (out / "analysis.json").write_text(json.dumps(_finite(analysis), indent=1))
    _plot_sparsity(out / "sparsity.png", analysis)
    _plot_spectrum(out / "spectrum.png", analysis)
    if "relex" in analysis:
        _plot_relex(out / "relex.png", analysis["relex"])
    print(_summary(args, analysis, base_dir, paths[-1], steps[-1], written))
    print(f"wrote {out / 'analysis.json'} and the plots in {out}")
    return 0
