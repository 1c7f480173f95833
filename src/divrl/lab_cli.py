"""`divrl lab`: exact fixed points of regularized RL on a toy problem, and the reward–KL frontier of
KL-regularized RL against best-of-n (methods.md "Closed forms" C1–C5).

For a toy problem (given by --rewards/--ref, or random) prints, for each β and each divergence D,
p* = argmax_p E_p[r] − β·D(p, ref) (closed form for reverse KL, forward KL and χ², else the exact
LBFGS solver) with E_p*[r] and KL(p*‖ref); then best-of-n against KL-RL at the same KL; and writes
a PNG of reward against KL(π‖ref) for KL-RL, forward-KL-RL and χ²-RL (β swept) and best-of-n.
"""

from __future__ import annotations

import argparse
import sys

import torch

from divrl import divergences, lab

DEFAULT_DIVERGENCES = ["reverse_kl", "forward_kl", "chi2", "jsd", "hellinger"]
_SHOWN_TOKENS = 12


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `lab` subcommand on an argparse subparsers object; its handler is `run`."""
    parser = subparsers.add_parser(
        "lab",
        help="exact tabular lab: regularized-RL fixed points and the best-of-n frontier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vocab", type=int, default=8, help="vocabulary size of a random problem (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problem")
    parser.add_argument(
        "--rewards",
        type=float,
        nargs="+",
        metavar="R",
        help="per-token rewards of a given problem (instead of a random one)",
    )
    parser.add_argument(
        "--ref",
        type=float,
        nargs="+",
        metavar="Q",
        help="reference weights, one per reward, normalized here; 0 = off-support (default uniform)",
    )
    parser.add_argument(
        "--betas",
        type=float,
        nargs="+",
        default=[0.05, 0.2, 1.0],
        metavar="BETA",
        help="regularization strengths of the table (default 0.05 0.2 1.0)",
    )
    parser.add_argument(
        "--divergences",
        nargs="+",
        default=DEFAULT_DIVERGENCES,
        metavar="NAME",
        help="divrl.divergences names for the table (default: " + " ".join(DEFAULT_DIVERGENCES) + ")",
    )
    parser.add_argument("--max-n", type=int, default=32, help="largest best-of-n (default 32)")
    parser.add_argument("--out", default="lab_frontier.png", help="PNG path of the frontier plot")
    parser.set_defaults(func=run)
    return parser


def _problem(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(ref log-probs, rewards, description); raises ValueError on an inconsistent given problem."""
    if args.rewards is None:
        if args.ref is not None:
            raise ValueError("--ref needs --rewards")
        if args.vocab < 2:
            raise ValueError(f"--vocab must be >= 2, got {args.vocab}")
        ref_logprobs, reward = lab.random_problem(args.vocab, seed=args.seed)
        return ref_logprobs, reward, f"random problem, V={args.vocab}, seed {args.seed}"
    reward = torch.tensor(args.rewards, dtype=torch.float64)
    weights = torch.tensor(args.ref or [1.0] * len(args.rewards), dtype=torch.float64)
    if weights.shape != reward.shape:
        raise ValueError(f"--ref has {weights.numel()} values, --rewards {reward.numel()}")
    if (weights < 0).any() or weights.sum() <= 0 or not torch.isfinite(reward).all():
        raise ValueError("--ref must be >= 0 with a positive sum, --rewards finite")
    return (weights / weights.sum()).log(), reward, f"given problem, V={reward.numel()}"


def _row(values: torch.Tensor) -> str:
    shown = " ".join(f"{v:.3f}" for v in values[:_SHOWN_TOKENS].tolist())
    return shown + (" …" if values.numel() > _SHOWN_TOKENS else "")


def _summary(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, reward: torch.Tensor):
    """(E_p[r], KL(p‖ref)) per row of `logprobs`."""
    return lab.expected_reward(logprobs, reward), divergences.reverse_kl(logprobs, ref_logprobs)


def _fixed_point(name, ref_logprobs, reward, beta) -> tuple[torch.Tensor, str]:
    """(p*, solver label): the closed form where `lab` has one, else the LBFGS solver."""
    if name in lab.CLOSED_FORMS:
        return lab.CLOSED_FORMS[name](ref_logprobs, reward, beta), "closed-form"
    return lab.regularized_optimum(ref_logprobs, reward, beta, name), "lbfgs"


def _print_fixed_points(args, ref_logprobs, reward) -> None:
    print("fixed points p* = argmax_p E_p[r] - beta*D(p, ref)")
    print(f"{'beta':>8}  {'divergence':<15} {'solver':<11} {'E[r]':>8} {'KL(p|ref)':>10}  p*")
    for beta in args.betas:
        for name in args.divergences:
            policy, solver = _fixed_point(name, ref_logprobs, reward, beta)
            value, kl = _summary(policy, ref_logprobs, reward)
            print(
                f"{beta:>8.4g}  {name:<15} {solver:<11} {value.item():>8.4f} {kl.item():>10.4f}  {_row(policy.exp())}"
            )


def _best_of_n_curve(ref_logprobs, reward, max_n):
    """(E_BoN[r], KL(BoN‖ref)) for n = 1..max_n, each of shape (max_n,)."""
    ns = torch.arange(1, max_n + 1, dtype=reward.dtype).unsqueeze(-1)
    return _summary(lab.best_of_n(ref_logprobs.exp(), reward, ns).log(), ref_logprobs, reward)


def _print_best_of_n(ref_logprobs, reward, curve) -> None:
    print("\nbest-of-n vs KL-RL at the same KL (C5; KL-RL is the reward frontier)")
    print(f"{'n':>5} {'E_BoN[r]':>9} {'KL(BoN|ref)':>12} {'log n-(n-1)/n':>14} {'E_KL-RL[r]':>11}")
    values, kls = curve
    max_n = len(values)
    for n in sorted({2**k for k in range(max_n.bit_length())} | {max_n}):
        kl = max(kls[n - 1].item(), 0.0)  # n = 1 gives ±1e-17
        frontier = lab.tilted_at_kl(ref_logprobs, reward, kl)[0]
        print(
            f"{n:>5} {values[n - 1].item():>9.4f} {kl:>12.4f} {lab.best_of_n_kl(n):>14.4f} "
            f"{lab.expected_reward(frontier, reward).item():>11.4f}"
        )


def _plot_frontier(path, title, ref_logprobs, reward, curve) -> None:
    from matplotlib.figure import Figure

    on = ref_logprobs > -torch.inf
    spread = (reward[on].max() - reward[on].min()).clamp_min(1e-12)
    betas = spread * torch.logspace(-2.5, 2.5, 200, dtype=reward.dtype).unsqueeze(-1)
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.add_subplot()
    styles = {
        "reverse_kl": ("KL-RL (reverse KL, C1)", "-", 2.5),
        "forward_kl": ("forward-KL-RL (C3)", "--", 1.5),
        "chi2": ("$\\chi^2$-RL (C4)", ":", 1.8),
    }
    for name, (label, style, width) in styles.items():
        policies = lab.CLOSED_FORMS[name](ref_logprobs, reward, betas)
        values, kls = _summary(policies, ref_logprobs, reward)
        finite = kls.isfinite()
        if not finite.all():
            label += f"; {int((~finite).sum())}/{len(kls)} β leave supp(ref), KL = ∞"
        ax.plot(kls[finite], values[finite], style, lw=width, label=label)
    values, kls = curve
    ns = range(1, len(values) + 1)
    ax.plot(kls, values, "o", ms=4, color="black", label="best-of-n, exact KL")
    ax.plot(
        [lab.best_of_n_kl(n) for n in ns],
        values,
        "o",
        ms=4,
        mfc="none",
        color="tab:red",
        label="best-of-n placed at log n − (n−1)/n",
    )
    for n in ns:
        if n > 1 and n & (n - 1) == 0:
            ax.annotate(
                f"n={n}",
                (kls[n - 1], values[n - 1]),
                textcoords="offset points",
                xytext=(-6, 6),
                ha="right",
                fontsize=8,
            )
    ax.set_xlabel("$\\mathrm{KL}(\\pi\\,\\|\\,\\pi_{\\mathrm{ref}})$  [nats]")
    ax.set_ylabel("expected reward  $\\mathbb{E}_\\pi[r]$")
    ax.set_title(f"Reward–KL frontier, {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8.5)
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    """Handler of `divrl lab`: print the fixed-point and best-of-n tables, write the PNG."""
    try:
        ref_logprobs, reward, title = _problem(args)
        for name in args.divergences:
            divergences.get(name)
        if min(args.betas) <= 0 or args.max_n < 1:
            raise ValueError("--betas must be > 0 and --max-n >= 1")
    except ValueError as err:
        print(f"divrl lab: error: {err}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tables of a few entries: a thread pool only adds overhead
    try:
        print(f"{title}\n  reward {_row(reward)}\n  ref    {_row(ref_logprobs.exp())}\n")
        _print_fixed_points(args, ref_logprobs, reward)
        curve = _best_of_n_curve(ref_logprobs, reward, args.max_n)
        _print_best_of_n(ref_logprobs, reward, curve)
        _plot_frontier(args.out, title, ref_logprobs, reward, curve)
    finally:
        torch.set_num_threads(threads)
    print(f"\nwrote {args.out}")
    return 0
