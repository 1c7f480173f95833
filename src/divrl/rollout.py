"""Sample G completions per prompt from a causal LM, the way a GRPO step needs them.

Cost model (SmolLM2-135M, 2-core CPU): prefill is compute bound and a decode step is mostly the
weight matmuls, so the work is cut where it is redundant —
- each unique prompt is prefilled once (P rows, not P·G) and its KV cache is copied G times;
- the KV cache lives in buffers sized for the whole rollout, so a decode step writes one slice
  instead of re-concatenating the cache (`DynamicCache` does a torch.cat per layer per step);
- a row leaves the batch (and the cache) as soon as it samples a stop token; on CUDA, where a
  small model's decode step is bound by kernel launches from Python, every row stays instead
  (`_StaticBatch`) and each step replays one captured CUDA graph: on an H200, 32 rows of
  SmolLM2-135M's architecture decoded 4765 tokens/s with the graph, 991 eagerly, HF ``generate`` 962;
- a token is drawn by a two-level inverse CDF (two uniforms per row) instead of
  `torch.multinomial`, which on CPU draws one exponential per vocabulary entry; top-p looks at a
  top-k prefix of the distribution, widened until it holds the nucleus, instead of sorting the
  whole vocabulary.
The distribution is HF ``generate(do_sample=True)``'s: softmax(logits / T), restricted to the
top-p nucleus. Each sampled token y comes with its log-probability under that distribution, the
behaviour policy b of PPO ratios and k1/k3 estimators: log b(y) = log(w_y / Σ_{j∈nucleus} w_j),
w = softmax(logits / T) (the whole vocabulary when top_p = 1); log b = 0 for greedy (T = 0). It is
the drawn entry's weight over its row's kept mass (float64), one gather and one sum of what the
draw already holds, not a second pass over the logits.
- on CPU a Llama's decode step is `llama_decode`'s, the forward's arithmetic in fewer operations
  (a 32-row, 64-token rollout of SmolLM2-135M in bf16: 2.03–2.21 s against 2.18–2.27 through the
  forward, the same tokens and log-probs);
- on CPU the linear layers run on oneDNN with their weights reordered once per rollout
  (``packed_linears``; under bf16 autocast the linears alone in bf16): on a 2-core AVX2 EPYC, a 32-row decode
  matmul with the output layer's 49152 × 576 weight ran at 82 GFLOP/s against 31 for
  ``F.linear`` (MKL), the body's 576 × 1536 at 86 against 61; the reorder of all weights takes
  ~0.5 s.
``torch.compile`` of the decode step was measured and is not used: ~2 min to compile, another on
the first batch shrink, and no faster once compiled on this CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer

from divrl import attention, llama_decode
from divrl.hidden import cache_with_layers, left_pad
from divrl.models import replaced_forwards


@dataclass
class Rollout:
    """Completions of a batch of prompts, group-major: completions of prompt i are rows i*G .. i*G+G-1.

    ``logprobs[r][t]`` is log b(completion_ids[r][t]), b the distribution the token was drawn from:
    softmax(logits / T) renormalized on the top-p nucleus, the behaviour policy of the PG ratio and
    of the sampled KL estimators (0.0 under greedy decoding)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # P*G rows, unpadded; ends with the stop token if the row stopped
    logprobs: list[list[float]]  # like completion_ids: log b(token) of each sampled token
    finished: list[bool]  # P*G: True if the row ended on a stop token, False if cut at max_new_tokens
    group_size: int
    entropies: list[list[float]] | None = None  # with_entropy: H(softmax(logits / T)) at each token


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Index i of each row with probability weights[i] / Σ weights, by inverse CDF (one uniform a row)."""
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)
    # drawn on the generator's device (the CPU's, for the trainer): the same draws on any device
    u = torch.rand(
        len(weights),
        1,
        generator=generator,
        dtype=torch.float64,
        device=None if generator is None else generator.device,
    ).to(weights.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=weights.shape[-1] - 1).squeeze(1)


def draw(weights: torch.Tensor, generator: torch.Generator | None, block: int = 256) -> torch.Tensor:
    """Index i of each row with probability weights[i] / Σ weights (weights ≥ 0, any scale).

    Two inverse-CDF draws: a block of `block` entries by its total weight W_b, then an entry within
    it, so P(i) = W_b/W · w_i/W_b exactly, and only block sums and one block get a float64 cumsum
    (a full-vocabulary cumsum, or `torch.multinomial`'s one exponential per entry, costs far more).
    """
    rows, n = weights.shape
    padded = torch.nn.functional.pad(weights, (0, -n % block)) if n % block else weights  # pad copies
    blocks = padded.reshape(rows, -1, block)
    chosen = _draw(blocks.sum(dim=-1), generator)
    within = _draw(blocks[torch.arange(rows, device=weights.device), chosen], generator)
    return (chosen * block + within).clamp_(max=n - 1)


def nucleus(probs: torch.Tensor, top_p: float, first_k: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, token ids) of each row's top-p nucleus, most probable first, zero-padded on the right.

    The nucleus is the smallest set of most probable tokens whose mass reaches top_p (Holtzman et
    al. 2020): token j is kept iff the mass of the tokens ranked above it is < top_p, the set HF's
    ``TopPLogitsWarper`` keeps. Only a row's top k are sorted; the rows whose nucleus does not fit
    go round again with k ×8 (a full sort of the vocabulary costs ~20× a top-256).
    """
    rows, vocab = probs.shape
    k = min(first_k, vocab)
    pending = torch.arange(rows, device=probs.device)
    found = []  # (rows, nucleus probs, ids), one entry per round
    while len(pending):
        top, ids = probs[pending].topk(k, dim=-1)
        mass_before = top.cumsum(dim=-1) - top
        fits = (mass_before[:, -1] + top[:, -1] >= top_p) | (k == vocab)
        found.append((pending[fits], top[fits].masked_fill(mass_before[fits] >= top_p, 0.0), ids[fits]))
        pending = pending[~fits]
        k = min(8 * k, vocab)
    width = found[-1][1].shape[-1]
    weights = probs.new_zeros(rows, width)
    token_ids = torch.zeros(rows, width, dtype=torch.long, device=probs.device)
    for done, top, ids in found:
        weights[done, : top.shape[-1]] = top
        token_ids[done, : ids.shape[-1]] = ids
    return weights, token_ids


def entropy_of(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """H(softmax(logits / T)) per row in nats (float32); T = 0 (greedy) reads as T = 1."""
    logp = (logits.float() / (temperature or 1.0)).log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, log b(token)) per row, drawn from b = softmax(logits / T) restricted to the top-p
    nucleus and renormalized on it; T = 0 is greedy (b one-hot, log b = 0). log b is float64."""
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.zeros(len(tokens), dtype=torch.float64, device=logits.device)
    probs = (logits.float() / temperature if temperature != 1.0 else logits.float()).softmax(dim=-1)
    if top_p >= 1.0:
        tokens = draw(probs, generator)
        return tokens, probs.gather(1, tokens[:, None]).squeeze(1).double().log()
    weights, ids = nucleus(probs, top_p)
    chosen = draw(weights, generator)[:, None]
    kept_mass = weights.sum(dim=-1, keepdim=True, dtype=torch.float64)
    logprobs = (weights.gather(1, chosen).double() / kept_mass).log()
    return ids.gather(1, chosen).squeeze(1), logprobs.squeeze(1)


class _BufferLayer(DynamicLayer):
    """One attention layer's KV in buffers preallocated to `capacity` positions: a step writes a
    slice instead of concatenating. Private to `sample` (crop/reset of the parent do not apply)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.write_at: torch.Tensor | None = None  # `_StaticBatch`: the position a step writes, on the device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.device = key_states.device
        # On the CPU the keys are stored (batch, heads, dim, capacity) behind a transposed view, so
        # that a decode step's q·kᵀ (`attention.one_query`) reads each head's keys as one matrix of
        # contiguous rows: at SmolLM2-135M's decode shape (32 rows, 3 key/value heads, 100 keys,
        # 30 layers, caches cold) 259 against 340 µs a layer on a 2-core AVX512-BF16 EPYC.
        self.keys_transposed = self.device.type == "cpu"
        if self.keys_transposed:
            self.key_buffer = key_states.new_empty(batch, heads, dim, self.capacity).transpose(-1, -2)
        else:
            self.key_buffer = key_states.new_empty(batch, heads, self.capacity, dim)
        self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _expose(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]
        return self.keys, self.values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.write_at is not None:  # the whole buffer: the step's mask hides the positions not written yet
            self.key_buffer.index_copy_(2, self.write_at, key_states)
            self.value_buffer.index_copy_(2, self.write_at, value_states)
            return self.key_buffer, self.value_buffer
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        return self._expose()

    def get_seq_length(self) -> int:
        return self.length

    def _rows(self, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Both buffers' rows replaced by `select` of them, each buffer keeping its memory layout."""
        if not self.is_initialized:  # a layer that reuses another layer's KV never stores any
            return
        if self.keys_transposed:
            self.key_buffer = select(self.key_buffer.transpose(-1, -2)).transpose(-1, -2)
        else:
            self.key_buffer = select(self.key_buffer)
        self.value_buffer = select(self.value_buffer)
        self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda buffer: buffer.index_select(0, indices))


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == packed.dtype:  # cast once by the caller (`llama_decode`): no cast either way
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "").to(x.dtype)


def _packed(dtype: torch.dtype, linear: torch.nn.Linear) -> partial:
    """`linear`'s forward on oneDNN in `dtype` (its input cast to it and the product back), its
    weight cast and reordered once, now."""
    packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), None)
    return partial(_packed_forward, packed, None if linear.bias is None else linear.bias.detach().to(dtype))


@contextmanager
def packed_linears(model: PreTrainedModel) -> Iterator[torch.dtype | None]:
    """Inside, the model's float32 ``nn.Linear`` layers (no gradient; under autocast also those
    stored in its dtype) compute on oneDNN with their weights reordered once, here, into its
    blocked layout: the same products as ``F.linear`` to float32 rounding, faster at decode's few
    rows. The context gives the dtype they compute in (None where nothing is packed); a packed
    layer returns its product in its input's dtype, so an input already in that dtype is not cast.

    Under CPU bf16 autocast the linear layers alone compute in bf16 (inputs and the reordered
    weights rounded to bf16, as autocast rounds them; products back in float32), and autocast is
    off inside: attention, norms and the softmax run in float32. Sampling and the update then
    differ in precision by that much (issue 10 allows it where it pays): on an AVX512-BF16 EPYC
    a 32-row, 64-token rollout of SmolLM2-135M took 2.85 s so, 4.6–5.5 s under autocast (whose
    bf16 attention is slow at one query row) and 3.9–4.0 s in float32. Nothing changes off CPU,
    under another autocast, or without oneDNN."""
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast else torch.float32
    # float32 weights, and those a frozen model stores in the autocast dtype (`models.frozen_for`)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype in (torch.float32, dtype)]
    usable = (
        model.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and dtype in (torch.float32, torch.bfloat16)
        and not torch.is_grad_enabled()
    )
    if not usable or not linears:
        yield None
        return
    with torch.autocast("cpu", enabled=False), replaced_forwards(linears, partial(_packed, dtype)):
        yield dtype


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    with_entropy: bool = False,
    static: bool | None = None,
) -> Rollout:
    """Sample ``group_size`` completions of each prompt, each up to ``max_new_tokens`` long and
    ending at the first stop token (see the module docstring for how). Reproducible for a seeded
    ``generator``; ``temperature=0`` decodes greedily. The model samples in eval mode (no dropout;
    HF layers skip the cache under gradient checkpointing in training mode) and gets its mode back.
    `with_entropy` also returns the entropy of softmax(logits / T) (the whole vocabulary, before
    top-p; T = 1 for greedy) at each sampled position, from the logits the draw used. `static` keeps
    every row in the decode batch to the end, so that on CUDA each step replays one CUDA graph
    (`_StaticBatch`; it needs `attention.plain_sdpa`); None: static on CUDA where the model allows,
    elsewhere rows leave the batch as they stop (on a CPU a stopped row would cost compute). Both
    give the same tokens to float rounding."""
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    if group_size < 1 or max_new_tokens < 0:
        raise ValueError(f"need group_size >= 1 and max_new_tokens >= 0, got {group_size}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if static is None:
        static = model.device.type == "cuda" and attention.plain_sdpa(model)
    elif static and not attention.plain_sdpa(model):
        raise ValueError("static=True needs a model whose every layer is full attention through divrl's SDPA")
    was_training = model.training
    model.eval()
    try:
        with packed_linears(model) as linear_dtype:
            completions, logprobs, finished, entropies = _decode(
                model,
                prompt_ids,
                group_size,
                max_new_tokens,
                stop_token_ids,
                pad_token_id,
                temperature,
                top_p,
                generator,
                with_entropy,
                static,
                linear_dtype,
            )
    finally:
        model.train(was_training)
    return Rollout(
        prompt_ids=[list(p) for p in prompt_ids],
        completion_ids=completions,
        logprobs=logprobs,
        finished=finished,
        group_size=group_size,
        entropies=entropies,
    )


class _ShrinkingBatch:
    """The decode batch of the rows still sampling: a row that stops leaves it, and the cache. With
    packed linears (`linear_dtype`), a Llama's step is `llama_decode`'s, not its forward."""

    def __init__(
        self,
        model: PreTrainedModel,
        cache: Any,
        mask: torch.Tensor,
        position: torch.Tensor,
        width: int,
        linear_dtype: torch.dtype | None,
    ):
        self.model, self.cache, self.mask, self.position, self.width = model, cache, mask, position, width
        self.llama_step_dtype = linear_dtype if linear_dtype is not None and llama_decode.supports(model) else None

    def next_logits(self, step: int, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Logits of the next position of the live rows, given their `step`-th tokens; `keep`: the
        batch rows that go on (None: all)."""
        if keep is not None:
            tokens, self.mask, self.position = tokens[keep], self.mask[keep], self.position[keep]
            self.cache.batch_select_indices(keep)
        self.position = self.position + 1
        mask = self.mask[:, : self.width + step + 1]
        if self.llama_step_dtype is not None:
            return llama_decode.next_logits(self.model, self.cache, tokens, self.position, mask, self.llama_step_dtype)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=self.position,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]


class _StaticBatch:
    """Every row stays in the decode batch to the end (a stopped row's next tokens are computed and
    dropped), so each step has the same shapes and reads and writes the same buffers: the KV cache
    written at a position held on the device, a (rows, 1, 1, capacity) mask that opens one column
    a step. On CUDA the step is captured once as a CUDA graph and replayed: one graph launch a step
    (and the few kernels that set its inputs), where the eager step launched ~1,500 kernels from
    Python on an H200 (SmolLM2-135M's architecture, sampling included)."""

    def __init__(self, model: PreTrainedModel, cache: Any, mask: torch.Tensor, position: torch.Tensor, width: int):
        self.model, self.cache, self.width = model, cache, width
        device = mask.device
        self.live = torch.arange(len(mask), device=device)  # the batch rows still sampling
        self.tokens = torch.zeros(len(mask), 1, dtype=torch.long, device=device)
        self.position = position.clone()
        self.attend = mask.bool()[:, None, None, :].clone()
        self.attend[..., width:] = False
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        for layer in cache.layers:
            layer.write_at = self.write_at
            if layer.is_initialized:  # attention reads every position: 0 · (NaN in unwritten memory) is NaN
                layer.key_buffer[:, :, width:] = 0
                layer.value_buffer[:, :, width:] = 0
        self.eager = device.type != "cuda"
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured
        self.logits = torch.empty(0)

    def _forward(self) -> torch.Tensor:
        out = self.model(
            input_ids=self.tokens,
            attention_mask=self.attend,
            position_ids=self.position,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _captured(self) -> torch.Tensor:
        """The step's logits, its forward captured as a CUDA graph (after the warm-up run on a side
        stream that capture needs: the step's own cache writes, which the replay repeats). A forward
        that capture refuses (one that waits on the host, say) runs eagerly from then on, with a warning."""
        device = self.tokens.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        autocast = torch.autocast(
            "cuda",
            dtype=torch.get_autocast_dtype("cuda"),
            enabled=torch.is_autocast_enabled("cuda"),
            cache_enabled=False,  # graphs cannot capture autocast's weight cache
        )
        with autocast:
            with torch.cuda.stream(side):
                self._forward()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.logits = self._forward()
            except RuntimeError as err:
                warnings.warn(f"decoding without a CUDA graph: its capture failed: {err}", RuntimeWarning, stacklevel=3)
                self.eager = True
                return self._forward()
        self.graph = graph
        self.graph.replay()
        return self.logits

    def next_logits(self, step: int, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """`_ShrinkingBatch.next_logits`, every row computed and the live ones returned."""
        if keep is not None:
            tokens, self.live = tokens[keep], self.live[keep]
        self.tokens[self.live] = tokens[:, None]
        self.position.add_(1)
        self.write_at.fill_(self.width + step)
        self.attend[..., self.width + step] = True
        if self.eager:
            logits = self._forward()
        elif self.graph is None:
            logits = self._captured()
        else:
            self.graph.replay()
            logits = self.logits
        return logits[self.live]


def _decode(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    group_size: int,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    with_entropy: bool,
    static: bool,
    linear_dtype: torch.dtype | None,
) -> tuple[list[list[int]], list[list[float]], list[bool], list[list[float]] | None]:
    """(completions, logprobs, finished, entropies or None) of `sample`: prefill the P prompts, copy
    their cache G times, decode in a `_StaticBatch` (`static`) or a `_ShrinkingBatch` (given the
    packed linears' `linear_dtype`)."""
    device = model.device
    ids, prompt_mask = left_pad(prompt_ids, pad_token_id)
    width = ids.shape[1]
    mask = torch.ones(len(prompt_ids), width + max_new_tokens, dtype=torch.long)
    mask[:, :width] = prompt_mask
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask[:, :width].cumsum(dim=1) - 1).clamp(min=0)

    cache = cache_with_layers(model, partial(_BufferLayer, width + max_new_tokens))
    out = model(
        input_ids=ids,
        attention_mask=mask[:, :width],
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)
    cache.batch_repeat_interleave(group_size)
    state = (
        model,
        cache,
        mask.repeat_interleave(group_size, dim=0),
        positions[:, -1:].repeat_interleave(group_size, dim=0),
        width,
    )
    batch = _StaticBatch(*state) if static else _ShrinkingBatch(*state, linear_dtype)

    n_rows = len(prompt_ids) * group_size
    completions: list[list[int]] = [[] for _ in range(n_rows)]
    logprobs: list[list[float]] = [[] for _ in range(n_rows)]
    finished = [False] * n_rows
    entropies: list[list[float]] | None = [[] for _ in range(n_rows)] if with_entropy else None
    live = list(range(n_rows))  # the Rollout row of each live row
    stops = set(stop_token_ids)

    for step in range(max_new_tokens):
        tokens, token_logprobs = next_tokens(logits, temperature, top_p, generator)
        drawn = torch.stack([tokens.double(), token_logprobs]).tolist()  # one copy to the host a step
        for row, token, logprob in zip(live, map(int, drawn[0]), drawn[1]):
            completions[row].append(token)
            logprobs[row].append(logprob)
        if entropies is not None:
            for row, value in zip(live, entropy_of(logits, temperature).tolist()):
                entropies[row].append(value)
        going_on = []  # the batch rows that did not stop
        for i, row in enumerate(live):
            if completions[row][-1] in stops:
                finished[row] = True
            else:
                going_on.append(i)
        if step == max_new_tokens - 1 or not going_on:
            break
        keep = None
        if len(going_on) < len(live):
            live = [live[i] for i in going_on]
            keep = torch.tensor(going_on, device=device)
        logits = batch.next_logits(step, tokens, keep)

    return completions, logprobs, finished, entropies
