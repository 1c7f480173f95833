"""Forward + backward of a token-mean divergence loss from hidden states and output layers.

Shape: N tokens, vocabulary V = 49152, hidden H = 576 (SmolLM2-135M), float32 (this machine's fast
dtype). The policy side (hidden, weight) gets gradients, the target side is constant. Methods:

- ``naive``: full (N, V) logits of both models, ``divrl.divergences`` on their log_softmax
  (the unchunked reference: the same formulas, no streaming);
- ``trl``: full logits, TRL's ``GKDTrainer.generalized_jsd_loss`` (β = 1 reverse KL, β = 0
  forward KL);
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (token chunks × full vocabulary, gradients
  computed in the forward), PyTorch path (``compiled=False``), soft loss only;
- ``divrl``: ``divrl.chunked.divergence(...).mean()`` (tiles, recomputing custom backward);
- ``divrl_fused``: the same with ``token_weights`` (all ones) passed, so the gradient of the
  mean is computed during the forward from the tiles in hand (what a trainer's loss does);
- ``divrl_rowwise``: ``divrl.rowwise.divergence_to_target`` — the general path the objective uses
  for any target expression or divergence (64-row chunks of full-vocabulary log-probs with
  autograd, checkpointed), here on a plain model target to price its generality.

Each (method, divergence) runs in a fresh subprocess: the inputs are built and the code path is
warmed up on 16 tokens, the peak-RSS counter is reset (``/proc/self/clear_refs`` = 5), then one
forward + backward is timed (wall clock) and its memory is the peak RSS (``VmHWM``) minus the RSS
just before it: the memory the method adds on top of its inputs. Time is the best of ``--repeats``
runs. Ratios compare numbers from this same run. ``trl`` and ``liger`` need the ``bench`` extra;
``--methods`` picks a subset (ratios to Liger are printed when it ran). Usage:

    python benchmarks/chunked_divergence.py [--quick] [--repeats 2] [--methods naive,divrl_fused,divrl_rowwise]
"""

import argparse
import json
import os
import subprocess
import sys
import time

VOCAB, HIDDEN = 49152, 576
DIVERGENCES = {
    "reverse_kl": ("reverse_kl", {}, 1.0),
    "forward_kl": ("forward_kl", {}, 0.0),
    "jsd(0.5)": ("jsd", {"beta": 0.5}, 0.5),
}
METHODS = ("naive", "trl", "liger", "divrl", "divrl_fused", "divrl_rowwise")


def _loss_fn(method: str, divergence: str):
    """(hidden, weight, target_hidden, target_weight) → scalar mean divergence for one method."""
    import torch

    name, params, beta = DIVERGENCES[divergence]
    if method == "naive":
        from divrl import divergences

        def naive(h, w, th, tw):
            with torch.no_grad():
                target_logprobs = torch.log_softmax(th @ tw.T, -1)
            return divergences.get(name)(torch.log_softmax(h @ w.T, -1), target_logprobs, **params).mean()

        return naive
    if method == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        def trl(h, w, th, tw):
            with torch.no_grad():
                target_logits = th @ tw.T
            return GKDTrainer.generalized_jsd_loss(h @ w.T, target_logits, beta=beta)

        return trl
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger_loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=False)
        return lambda h, w, th, tw: liger_loss(h, w, th, tw, torch.zeros(h.shape[0], dtype=torch.long))
    from divrl.chunked import divergence as chunked_divergence

    if method == "divrl_rowwise":
        from divrl import divergences, rowwise
        from divrl.chunked import Head
        from divrl.spec import Target

        def row_chunks(h, w, th, tw):
            return rowwise.divergence_to_target(
                divergences.get(name),
                Target("reference"),
                rowwise.ModelOutputs(h, Head(w)),
                {"reference": rowwise.ModelOutputs(th, Head(tw))},
                torch.zeros(h.shape[0], dtype=torch.long),
                **params,
            ).mean()

        return row_chunks
    if method == "divrl_fused":  # the loss weights are known: gradient computed in the forward
        return lambda h, w, th, tw: chunked_divergence(
            name, h, w, th, tw, token_weights=torch.ones(h.shape[0]), **params
        ).mean()
    return lambda h, w, th, tw: chunked_divergence(name, h, w, th, tw, **params).mean()


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _worker(method: str, divergence: str, tokens: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN, generator=gen).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5).requires_grad_()
    target_hidden = torch.randn(tokens, HIDDEN, generator=gen)
    target_weight = torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5 * 1.5
    loss_fn = _loss_fn(method, divergence)
    loss_fn(hidden[:16], weight, target_hidden[:16], target_weight).backward()  # warm-up
    weight.grad = None
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    loss = loss_fn(hidden, weight, target_hidden, target_weight)
    loss.backward()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mib": _status_mib("VmHWM") - before,
        "loss": loss.item(),
        "grad_norm": weight.grad.norm().item(),
    }


def _measure(method: str, divergence: str, tokens: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, divergence, str(tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 512 tokens instead of 4096")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method; the best time counts")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "DIVERGENCE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, divergence, tokens = args.worker
        print(json.dumps(_worker(method, divergence, int(tokens))))
        return
    tokens = 512 if args.quick else 4096
    methods = [m for m in METHODS if m in args.methods.split(",")]
    ours = [m for m in methods if m.startswith("divrl")]
    print(
        f"N={tokens} V={VOCAB} H={HIDDEN} float32, forward+backward of the token-mean divergence; "
        f"time: best of {args.repeats} (s); memory: peak RSS added over the inputs (MiB), one subprocess each"
    )
    for divergence in DIVERGENCES:
        runs = {m: [_measure(m, divergence, tokens) for _ in range(args.repeats)] for m in methods}
        best = {m: min(r["seconds"] for r in rs) for m, rs in runs.items()}
        memory = {m: max(r["peak_mib"] for r in rs) for m, rs in runs.items()}
        cells = "  ".join(f"{m} {best[m]:.2f}s {memory[m]:.0f}MiB" for m in methods)
        ratios = "  ".join(
            f"{m}/{peer} time {best[m] / best[peer]:.2f} mem {memory[m] / memory[peer]:.3f}"
            for m in ours
            for peer in ("naive", "liger")
            if peer in best
        )
        losses = "/".join(f"{m} {runs[m][0]['loss']:.6g}" for m in methods)
        print(f"{divergence:<11} {cells}  |  {ratios}  |  loss {losses}", flush=True)
    for method in ours:  # the last run's divergence (jsd): each divrl path against the peers
        peers = " ".join(
            f"ratio_time_vs_{peer}={best[method] / best[peer]:.2f} "
            f"ratio_mem_vs_{peer}={memory[method] / memory[peer]:.3f}"
            for peer in ("naive", "liger")
            if peer in best
        )
        print(f"{method}: {peers}")


if __name__ == "__main__":
    main()
