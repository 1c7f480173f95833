"""The update's forward + backward, eager against `torch.compile` of the decoder layers.

    python benchmarks/update_compile.py eager
    python benchmarks/update_compile.py layers     # compiles first: minutes on a small CPU

The default model; per round, one micro-batch as `divrl.hidden.completion_hidden` runs it in the
update: 16 random completions of 8–63 tokens over 2 prompts of 60–79 tokens (lengths differ per
round, as rollouts do), then the backward of a stand-in loss on the hidden states. `layers`
compiles each decoder layer (`layer.compile(dynamic=True)`, regional compilation) with dynamo's
cache limits raised, so no layer falls back to eager. Prints each round's seconds (compiles
included) and the median of rounds 3..N.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo

from divrl.hidden import completion_hidden
from divrl.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("eager", "layers"))
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    model = load_model("default")[0].train()
    if args.mode == "layers":
        torch._dynamo.config.cache_size_limit = 512
        torch._dynamo.config.accumulated_cache_size_limit = 4096
        for layer in model.model.layers:
            layer.compile(dynamic=True)
    generator = torch.Generator()

    def tokens(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(100, 40000, (length,), generator=generator).tolist()

    seconds = []
    for round_ in range(args.rounds):
        generator.manual_seed(round_)
        prompts, completions = [tokens(60, 80) for _ in range(2)], [tokens(8, 64) for _ in range(16)]
        start = time.perf_counter()
        hidden = completion_hidden(model, prompts, completions, 0).hidden
        hidden.pow(2).mean().backward()
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        print(f"{args.mode} round {round_ + 1}: {seconds[-1]:.2f} s, {sum(map(len, completions))} tokens", flush=True)
    print(f"{args.mode}: median of rounds 3..{args.rounds}: {statistics.median(seconds[2:]):.2f} s")


if __name__ == "__main__":
    main()
