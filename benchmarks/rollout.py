"""Time divrl.rollout.sample against HF generate(num_return_sequences=G) on the same prompts.

    python benchmarks/rollout.py [--model /tmp/smolcache] [--prompts 8] [--group 8] [--new 48]
                                 [--repeats 2] [--threads N] [--device cpu|cuda|auto] [--profile]
                                 [--random-init]

On CUDA divrl's decode (steps replayed from a CUDA graph) is also timed eager (`static=False`).
Two settings: `stop` ends rows at the tokenizer's EOS (a real GRPO rollout); `full` forces every
row to max_new_tokens (equal work on both sides, HF via min_new_tokens). Throughput counts the
generated tokens that belong to completions (HF's padding after a row's EOS is not counted).
The two samplers alternate within each repeat, so a load change on a shared machine hits both.
`--profile` then runs each sampler once more under torch's profiler (with CUDA activity on a GPU)
and prints its busiest operators by time on the host, and how many host-device synchronizations
and copies it made: on a GPU, where a small model's decode step is bound by kernel launches and
Python, that is where a step's time goes.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from divrl import attention
from divrl.models import load_model, load_tokenizer, resolve_device
from divrl.rollout import sample


def load(spec: str, device: str, random_init: bool):
    """(model, tokenizer) of `spec`; with `random_init` its architecture (the config.json in the
    directory `spec`) with random weights, which decode the same operators."""
    if not random_init:
        model, tokenizer = load_model(spec, device=resolve_device(device))
        return model.eval(), tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec), dtype=torch.float32)
    attention.use(model)
    return model.to(resolve_device(device)).eval(), load_tokenizer(spec)


def chain_sum_prompts(tokenizer, n: int) -> list[list[int]]:
    import reasoning_gym

    from divrl.tasks import encode_prompt

    data = reasoning_gym.create_dataset("chain_sum", size=n, seed=0)
    return [encode_prompt(tokenizer, entry["question"], None) for entry in data]


def hf_generate(model, prompts, group, new, stop_id, pad_id, force_full, seed):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    torch.manual_seed(seed)
    out = model.generate(
        ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        num_return_sequences=group,
        max_new_tokens=new,
        min_new_tokens=new if force_full else 0,
        eos_token_id=None if force_full else stop_id,
        pad_token_id=pad_id,
    )[:, width:]
    if force_full:
        return out.numel()
    ends = (out == stop_id).int().cumsum(1)  # tokens after a row's first EOS are padding
    return int(((ends == 0) | ((ends == 1) & (out == stop_id))).sum())


def divrl_sample(model, prompts, group, new, stop_id, pad_id, force_full, seed, static=None):
    rollout = sample(
        model,
        prompts,
        group_size=group,
        max_new_tokens=new,
        stop_token_ids=[] if force_full else [stop_id],
        pad_token_id=pad_id,
        generator=torch.Generator().manual_seed(seed),
        static=static,
    )
    return sum(map(len, rollout.completion_ids))


def timed(fn, model, *args):
    synchronize(model)
    start = time.perf_counter()
    tokens = fn(model, *args)
    synchronize(model)
    return tokens, time.perf_counter() - start


def synchronize(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy")


def profiled(name: str, fn, model, *args) -> None:
    """Print where one run of `fn` spends its time: operators by self time on the host, and the
    host-device synchronizations and copies (CUDA runtime calls) it made."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        tokens, seconds = timed(fn, model, *args)
    events = prof.key_averages()
    print(f"--- {name}: {tokens} tokens in {seconds:.2f} s under the profiler")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    calls = {e.key: e.count for e in events if e.key in SYNCS}
    print(f"{name} host-device synchronizations and copies: {calls or 'none'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/smolcache")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="auto: CUDA when present")
    parser.add_argument("--profile", action="store_true", help="then profile one run of each sampler")
    parser.add_argument(
        "--random-init", action="store_true", help="--model's architecture with random weights (no weight files)"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device")
    torch.set_num_threads(args.threads)

    model, tokenizer = load(args.model, args.device, args.random_init)
    prompts = chain_sum_prompts(tokenizer, args.prompts)
    stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if stop_id is None or stop_id == tokenizer.unk_token_id:
        stop_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_id
    print(
        f"{args.prompts} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens) x "
        f"{args.group} samples x {args.new} new tokens, {model.dtype} on {model.device}, {args.threads} threads",
        flush=True,
    )
    sample(model, prompts[:1], group_size=2, max_new_tokens=2, stop_token_ids=[], pad_token_id=pad_id)  # warm-up

    _, prefill = timed(divrl_sample, model, prompts, args.group, 1, stop_id, pad_id, True, 0)
    print(f"divrl prefill + first token: {prefill:.2f} s", flush=True)
    samplers = {"divrl": divrl_sample, "hf": hf_generate}
    if model.device.type == "cuda":  # divrl replays a CUDA graph there; also time its eager decode
        samplers["divrl-eager"] = partial(divrl_sample, static=False)
    for setting, force_full in (("stop", False), ("full", True)):
        tokens, seconds = dict.fromkeys(samplers, 0), dict.fromkeys(samplers, 0.0)
        for seed in range(args.repeats):
            for name, fn in samplers.items():
                n, t = timed(fn, model, prompts, args.group, args.new, stop_id, pad_id, force_full, seed)
                tokens[name] += n
                seconds[name] += t
                print(f"[{setting}] {name:11s} seed {seed}: {n:5d} tokens in {t:6.2f} s", flush=True)
        rate = {name: tokens[name] / seconds[name] for name in samplers}
        for name in samplers:
            print(f"[{setting}] {name:11s} {rate[name]:6.1f} tok/s over {args.repeats} runs", flush=True)
        for name in (n for n in samplers if n != "hf"):
            print(f"[{setting}] {name} / hf throughput: {rate[name] / rate['hf']:.2f}x", flush=True)
    if args.profile:
        for name, fn in samplers.items():
            profiled(name, fn, model, prompts, args.group, args.new, stop_id, pad_id, False, 0)


if __name__ == "__main__":
    main()
