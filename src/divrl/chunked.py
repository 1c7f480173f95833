"""Exact per-token log-probs, entropies and divergences straight from hidden states.

The output head (``Head``) maps a hidden state to logits z = softcap(scale · (hidden @ weight.T +
bias)) / temperature, as a model's own head does (an lm_head bias, Cohere's logit scale,
Granite's logit divisor, Gemma-2's final softcap). The logits of N tokens over a vocabulary of V
are never built whole. They are computed tile by tile (``chunk_tokens`` rows × ``chunk_vocab``
columns), reduced with an online log-sum-exp (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax"), and recomputed tile by tile in a custom backward
(``torch.autograd.Function``), so gradients need no stored logits either.

Memory besides the inputs and their gradients: a few tiles per worker thread, and in the forward
of ``divergence`` the tiles of one row block (chunk_tokens × V per model per worker, 2 × 2 × 128 ×
49152 × 4 B ≈ 100 MB with the defaults) so that its second pass need not redo the matmuls; with
``token_weights``, also one weight-gradient (and bias-gradient) accumulator per worker thread,
as many workers as fit in ``ACCUMULATOR_BUDGET_BYTES``.

Work: ``logprob_entropy`` does one logits matmul forward and three backward (recompute, ∂hidden,
∂weight) against one and two for full logits; ``divergence`` two forward (policy, target) and four
backward against two and two, or with ``token_weights`` four in the forward and none backward,
like full logits. The extra matmuls are the price of no stored logits; on CPU it is more than
paid back by elementwise work on cache-sized tiles instead of (N, V) tensors
(benchmarks/chunked_divergence.py). A bias adds a row sum per tile for its gradient, a softcap a
tanh per tile and one more elementwise tile in the backward; the plain head (no bias, scale 1, no
softcap) pays for neither. Tiles run on Python threads with single-threaded ops (see
``_in_parallel``).

Dtypes: everything runs in the dtype it is given; log-sum-exps, sums and the returned values use
at least float32 (bfloat16/float16 inputs give float32 outputs; gradients come back in the
input's dtype). Measured against float64 on the same (rounded) inputs, N = 64, V = 49152,
H = 576, norm-wise relative error over tokens — float32: values ≤ 1.1e-6, gradients ≤ 4.2e-6
(reverse/forward KL, JSD, log-prob, entropy), the same as float32 full logits; bfloat16: values
≤ 1.1e-3 (sampled log-probs 1.9e-4 with hidden ~ N(0, 1), weight ~ N(0, 0.05²): the sampled
logit is the bfloat16 tile's, see ``logprob_entropy``), gradients ≤ 1.7e-2, set by the bfloat16
logits and again the same as bfloat16 full logits. float64 matches the full computation to ~1e-14
(tested to 1e-6).
"""

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from divrl import divergences

DEFAULT_CHUNK_TOKENS = 128
DEFAULT_CHUNK_VOCAB = 2048  # a 128 × 2048 float32 tile is 1 MiB: elementwise work stays in cache


@dataclasses.dataclass(frozen=True)
class Head:
    """Logits z = softcap(scale · (hidden @ weight.T + bias)) / temperature, softcap(x) = c·tanh(x/c)
    (none when softcap is None): an output layer with what its model applies after it.

    weight (V, H) and bias (V,) may require gradients; scale, softcap and temperature are constants.
    """

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.weight.dim() != 2 or (self.bias is not None and self.bias.shape != self.weight.shape[:1]):
            bias = None if self.bias is None else tuple(self.bias.shape)
            raise ValueError(
                f"a head needs weight (V, H) and bias (V,) or None: weight {tuple(self.weight.shape)}, bias {bias}"
            )
        if self.temperature <= 0 or (self.softcap is not None and self.softcap <= 0):
            raise ValueError(
                f"temperature and softcap must be positive: temperature {self.temperature}, softcap {self.softcap}"
            )

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def logits(self, hidden: Tensor) -> Tensor:
        """Full logits (..., V) of hidden (..., H), differentiable, in the dtypes the tiles use."""
        dtype = _compute_dtype(hidden, self)
        hidden, bias = hidden.to(dtype), None if self.bias is None else self.bias.to(dtype)
        with _autocast_off(hidden.device):
            lin = F.linear(hidden, self.weight.to(dtype), bias)
            return _activate(lin.to(_accumulation_dtype(lin.dtype)), self)

    def detach(self) -> "Head":
        bias = None if self.bias is None else self.bias.detach()
        return dataclasses.replace(self, weight=self.weight.detach(), bias=bias)

    def at_temperature(self, temperature: float) -> "Head":
        return dataclasses.replace(self, temperature=temperature)


def _as_head(head: Head | Tensor, temperature: float) -> Head:
    """A Head as given, or a bare output weight as Head(weight, temperature=temperature)."""
    if not isinstance(head, Head):
        return Head(head, temperature=temperature)
    if temperature != 1.0:
        raise ValueError(
            f"a Head carries its own temperature: pass head.at_temperature({temperature}) "
            f"instead of temperature={temperature}"
        )
    return head


def _constants(head: Head) -> tuple:
    """What a Head is besides its tensors: Head(weight, bias, *_constants(head)) rebuilds it."""
    return head.scale, head.softcap, head.temperature


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _compute_dtype(hidden: Tensor, head: Head) -> torch.dtype:
    """The dtype hidden and the head compute in: autocast's when it is on for their device (what
    the model's own head would use there), else the promoted dtype of hidden and weight."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, head.weight.dtype)


def _in_dtype(head: Head, dtype: torch.dtype) -> Head:
    """The head's weight and bias cast to dtype, detached: inside the streamed Functions, which
    return the gradients in the dtypes given (``_grad_dtypes``), so that a float32 weight under
    bf16 autocast gets its float32 gradient without a round trip through a bf16 copy of the
    (V, H) gradient (two vocabulary-sized copies per backward)."""
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    return dataclasses.replace(head, weight=head.weight.detach().to(dtype), bias=bias)


def _grad_dtypes(weight: Tensor, bias: Tensor | None) -> tuple[torch.dtype, torch.dtype | None]:
    return weight.dtype, None if bias is None else bias.dtype


def _autocast_off(device: torch.device) -> torch.autocast:
    """Tiles compute in the dtype they are given, on whichever thread runs them (autocast is
    per thread: worker threads never have it)."""
    return torch.autocast(device.type, enabled=False)


def _spans(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _activate(lin: Tensor, head: Head) -> Tensor:
    """z = softcap(scale · lin) / T from lin = hidden @ weight.T + bias, differentiable."""
    if head.softcap is None:
        factor = head.scale / head.temperature
        return lin if factor == 1.0 else lin * factor
    return torch.tanh(lin * (head.scale / head.softcap)) * (head.softcap / head.temperature)


def _activate_(lin: Tensor, head: Head) -> Tensor:
    """``_activate`` in place, for tiles (no autograd)."""
    if head.softcap is None:
        factor = head.scale / head.temperature
        return lin if factor == 1.0 else lin.mul_(factor)
    return lin.mul_(head.scale / head.softcap).tanh_().mul_(head.softcap / head.temperature)


def _tile_logits(hidden: Tensor, head: Head, cols: slice) -> Tensor:
    """One tile of z (the rows of hidden × vocabulary cols), upcast to the accumulation dtype."""
    bias = None if head.bias is None else head.bias[cols]
    return _activate_(F.linear(hidden, head.weight[cols], bias).to(_accumulation_dtype(hidden.dtype)), head)


def _slope(head: Head, logp: Tensor, lse: Tensor) -> float | Tensor:
    """dz/dlin on a tile whose logits are z = logp + lse (per row): scale/T, and with a softcap c
    also 1 − (z·T/c)² (tanh' = 1 − tanh²), a new tile."""
    factor = head.scale / head.temperature
    if head.softcap is None:
        return factor
    tanh = (logp + lse[:, None]).mul_(head.temperature / head.softcap)
    return tanh.square_().neg_().add_(1.0).mul_(factor)


def _times_(tile: Tensor, slope: float | Tensor) -> Tensor:
    """tile · slope in place (nothing to do for the constant 1)."""
    return tile if isinstance(slope, float) and slope == 1.0 else tile.mul_(slope)


def _workers(n_items: int, device: torch.device) -> int:
    """CPU: one Python thread per intra-op thread; accelerators queue their own work: one."""
    return max(1, min(torch.get_num_threads(), n_items)) if device.type == "cpu" else 1


ACCUMULATOR_BUDGET_BYTES = 2 * 1024**3  # the per-worker weight-gradient accumulators, together


def _accumulating_workers(workers: int, weight: Tensor, dtype: torch.dtype) -> int:
    """Workers for a pass that keeps one (V, H) weight-gradient accumulator per worker: as many as
    fit in ACCUMULATOR_BUDGET_BYTES (at least one): 16 threads with a 152k × 1536 head would
    otherwise hold 15 GB of accumulators."""
    per_worker = weight.numel() * torch.finfo(dtype).bits // 8
    return max(1, min(workers, ACCUMULATOR_BUDGET_BYTES // per_worker))


def _in_parallel(task: Callable[[int, Any], object], items: Sequence[Any], workers: int) -> None:
    """task(worker, item) for every item: worker k takes items k, k + workers, … in order.

    Each worker is a Python thread whose ops are single-threaded (torch releases the GIL inside
    them). Tiles are small, so OpenMP's fork/join per op costs more than it gains, and it
    collapses (measured 9× slower) when another process shares the cores. The fixed assignment
    keeps every sum in a fixed order: results are deterministic.
    """
    if workers == 1:
        for item in items:
            task(0, item)
        return

    def run(worker: int) -> None:
        torch.set_num_threads(1)  # this thread's intra-op pool (restored globally below)
        with torch.no_grad():  # grad mode is per thread: tiles never build graphs by accident
            for item in items[worker::workers]:
                task(worker, item)

    saved = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, range(workers)))
    finally:
        torch.set_num_threads(saved)


def _add_matmul(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, in place when the dtypes allow (float32/64), else through a temporary."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b


def _sum_into_first(tensors: list[Tensor]) -> Tensor:
    """Σ tensors in a fixed order, written into the first (per-thread partial sums)."""
    for tensor in tensors[1:]:
        tensors[0] += tensor
    return tensors[0]


def _cast(grad: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    if grad is None:
        return None
    assert dtype is not None  # autograd asks no gradient of an absent input (a None bias)
    return grad.to(dtype)


def _backprop_tiles(ctx, hidden, head, tile_grad, chunk_tokens, chunk_vocab):
    """Gradients of hidden, weight and bias (inputs 0, 1, 2 of ``ctx``) given ∂L/∂lin tile by tile.

    ``tile_grad(rows, cols)`` returns G = ∂L/∂lin for that tile (lin = hidden @ weight.T + bias:
    ∂L/∂z times ``_slope``), so grad_hidden[rows] += G @ weight[cols], grad_weight[cols] += Gᵀ @
    hidden[rows] and grad_bias[cols] += Σ_rows G. Threads take whole vocabulary chunks (their
    grad_weight and grad_bias rows are theirs alone) and sum grad_hidden apart.
    """
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    weight, acc = head.weight, _accumulation_dtype(hidden.dtype)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(head.vocab_size, dtype=acc, device=weight.device) if need_bias else None
    vocab = _spans(head.vocab_size, chunk_vocab)
    workers = _workers(len(vocab), hidden.device)
    partial_grad_hidden = [
        torch.zeros(hidden.shape, dtype=acc, device=hidden.device) for _ in range(workers if need_hidden else 0)
    ]

    def vocab_chunk(worker, cols):
        for rows in _spans(hidden.shape[0], chunk_tokens):
            grad_lin = tile_grad(rows, cols)
            if need_bias:
                grad_bias[cols] += grad_lin.sum(0)
            grad_lin = grad_lin.to(hidden.dtype)
            if need_hidden:
                _add_matmul(partial_grad_hidden[worker][rows], grad_lin, weight[cols])
            if need_weight:
                _add_matmul(grad_weight[cols], grad_lin.T, hidden[rows])

    with _autocast_off(hidden.device):
        _in_parallel(vocab_chunk, vocab, workers)
    grad_hidden = _sum_into_first(partial_grad_hidden) if need_hidden else None
    return _cast(grad_hidden, hidden.dtype), *(_cast(g, d) for g, d in zip((grad_weight, grad_bias), ctx.grad_dtypes))


# A log-probability floor below which exp is 0 in float32 and float64 (the tiles' dtypes): logits
# of −inf (a bias masking padded vocabulary) are raised to it so that p·log p is 0·finite = 0.
_LOG_ZERO = -1e4


def _merge_entropies(lse_a, entropy_a, lse_b, entropy_b):
    """Log-normalizer and entropy of a distribution split over two disjoint vocabulary parts.

    With mass w_k = exp(lse_k − lse) on part k: H = Σ_k w_k H_k − Σ_k w_k log w_k, a part with no
    mass (all logits −inf) adding 0.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    log_wa, log_wb = lse_a - lse, lse_b - lse
    share_a = torch.where(log_wa > -torch.inf, log_wa.exp() * (entropy_a - log_wa), 0.0)
    share_b = torch.where(log_wb > -torch.inf, log_wb.exp() * (entropy_b - log_wb), 0.0)
    return lse, share_a + share_b


def _chunk_lse_entropy(z: Tensor) -> tuple[Tensor, Tensor]:
    """log Σ e^z and the entropy of softmax(z) along the last dim, one pass over the tile; −inf
    logits count as mass 0 (a tile of only −inf: lse −inf, entropy NaN, which the merge drops)."""
    shift = z.amax(-1, keepdim=True).clamp_(min=torch.finfo(z.dtype).min)
    y = (z - shift).clamp_(min=_LOG_ZERO)
    e = y.exp()
    mass = e.sum(-1)
    log_mass = mass.log()
    return shift.squeeze(-1) + log_mass, log_mass - e.mul_(y).sum(-1) / mass


class _LseEntropy(torch.autograd.Function):
    """(log Σ_v e^{z_v}, H(softmax z), z_y) per row of the logits z of Head(weight, bias, *constants),
    streamed; z_y, the logit of the row's token y, is read from the tile that holds it.

    Backward: ∂lse/∂z_v = p_v, ∂H/∂z_v = −p_v (log p_v + H) and ∂z_y/∂z_v = [v = y], summed on
    each float32 tile, times dz/dlin (``_slope``). z_y's gradient is added on the tile that holds
    y, not through a gather of weight[y] (whose backward zero-filled a (V, H) gradient of its
    own), and before the tile's cast to the matmul dtype: in log p_y = z_y − lse the two terms
    cancel to (1 − p_y) in float32 first.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, constants, chunk_tokens, chunk_vocab):
        ctx.grad_dtypes = _grad_dtypes(weight, bias)
        head = _in_dtype(Head(weight, bias, *constants), hidden.dtype)
        acc = _accumulation_dtype(hidden.dtype)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        entropy, sampled = torch.empty_like(lse), torch.empty_like(lse)
        tile_of_token, column_of_token = tokens // chunk_vocab, tokens % chunk_vocab

        def row_block(_, rows):
            state, picked = None, None
            for k, cols in enumerate(_spans(head.vocab_size, chunk_vocab)):
                z = _tile_logits(hidden[rows], head, cols)
                at_column = z.gather(1, column_of_token[rows].clamp(max=z.shape[1] - 1)[:, None]).squeeze(1)
                picked = at_column if picked is None else torch.where(tile_of_token[rows] == k, at_column, picked)
                chunk = _chunk_lse_entropy(z)
                state = chunk if state is None else _merge_entropies(*state, *chunk)
            lse[rows], entropy[rows] = state
            sampled[rows] = picked

        blocks = _spans(hidden.shape[0], chunk_tokens)
        _in_parallel(row_block, blocks, _workers(len(blocks), hidden.device))
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) costs nothing
        ctx.save_for_backward(hidden, head.weight, head.bias, lse, entropy, tokens)
        ctx.setup = (constants, chunk_tokens, chunk_vocab)
        return lse, entropy, sampled

    @staticmethod
    def backward(ctx, grad_lse, grad_entropy, grad_sampled):
        if grad_lse is None and grad_entropy is None and grad_sampled is None:
            return (None,) * 7
        hidden, weight, bias, lse, entropy, tokens = ctx.saved_tensors
        constants, chunk_tokens, chunk_vocab = ctx.setup
        head = Head(weight, bias, *constants)

        def tile_grad(rows, cols):
            logp = _tile_logits(hidden[rows], head, cols).sub_(lse[rows, None])
            slope = _slope(head, logp, lse[rows])
            if grad_entropy is not None:
                coefficient = logp.clamp(min=_LOG_ZERO).add_(entropy[rows, None]).mul_(-grad_entropy[rows, None])
                if grad_lse is not None:
                    coefficient += grad_lse[rows, None]
                tile = logp.exp_().mul_(coefficient)
            elif grad_lse is not None:
                tile = logp.exp_().mul_(grad_lse[rows, None])
            else:
                tile = logp.zero_()
            if grad_sampled is not None:  # ∂z_y: the rows whose token is in this tile
                column = tokens[rows] - cols.start
                held = ((column >= 0) & (column < tile.shape[1])).nonzero().squeeze(1)
                tile[held, column[held]] += grad_sampled[rows][held]
            return _times_(tile, slope)

        grads = _backprop_tiles(ctx, hidden, head, tile_grad, chunk_tokens, chunk_vocab)
        return *grads, None, None, None, None


def logprob_entropy(
    hidden: Tensor,
    head: Head | Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
) -> tuple[Tensor, Tensor]:
    """Sampled-token log-prob and entropy of p = softmax(z), z = the head's logits of hidden.

    hidden (N, H), head a ``Head`` with weight (V, H) — or a bare weight, meaning Head(weight,
    temperature=temperature) — and tokens (N,) → (log p[tokens] (N,), H(p) (N,) in nats), both
    differentiable w.r.t. hidden, weight and bias. log p[y] = z_y − logsumexp(z); the entropy is
    merged across vocabulary chunks as H = Σ_k w_k H_k − Σ_k w_k log w_k (w_k: mass of chunk k).
    The (N, V) logits are never built.

    The value of z_y is the one in the tile the log-sum-exp summed, so log p ≤ 0 exactly in every
    dtype (lse ≥ max_v z_v ≥ z_y as computed); a z_y computed apart differs from the tile's by the
    tile's rounding — in bfloat16 up to half a step, log p up to +0.1 at logits of 30. Its gradient
    is that of the product hidden · weight[y] (+ bias[y]), the same function.
    """
    sampled, lse, entropy = _streamed(hidden, head, tokens, temperature, chunk_tokens, chunk_vocab)
    return sampled - lse, entropy


def logit_lse_entropy(
    hidden: Tensor,
    head: Head | Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
) -> tuple[Tensor, Tensor, Tensor]:
    """(z_y, logsumexp(z), H(p)) per row, each (N,) and differentiable w.r.t. hidden, weight and
    bias, from the same single streamed pass as ``logprob_entropy`` (arguments as there): the
    sampled token's logit, the log-normalizer and the entropy. z_y − lse is exactly
    ``logprob_entropy``'s log-prob (same value, same gradient); soft-Q readings of the logits
    (Q(s, y) = z_y, V(s) = lse) take the two apart. The (N, V) logits are never built."""
    return _streamed(hidden, head, tokens, temperature, chunk_tokens, chunk_vocab)


def _streamed(
    hidden: Tensor, head: Head | Tensor, tokens: Tensor, temperature: float, chunk_tokens: int, chunk_vocab: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(z_y as the tile holds it, lse, H), each differentiable (`_LseEntropy`)."""
    head = _as_head(head, temperature)
    hidden = hidden.to(_compute_dtype(hidden, head))
    with _autocast_off(hidden.device):
        lse, entropy, sampled = _LseEntropy.apply(
            hidden, head.weight, head.bias, tokens, _constants(head), chunk_tokens, chunk_vocab
        )
    return sampled, lse, entropy


def _term_and_grad(
    term: Callable[[Tensor, Tensor], Tensor], logp: Tensor, logq: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """term(log p, log q) elementwise and, when asked, g = ∂term/∂log p (autograd on the tile)."""
    if not need_grad:
        return term(logp, logq), None
    with torch.enable_grad():
        logp = logp.detach().requires_grad_()
        value = term(logp, logq)
        (grad,) = torch.autograd.grad(value.sum(), logp)
    return value.detach(), grad


def _logit_grad(grad, logp, grad_sum, upstream):
    """∂(Σ_t u_t D_t)/∂z on a tile from g = ∂term/∂log p: u ⊙ (g − p Σ_u g_u); overwrites its inputs."""
    return grad.sub_(logp.exp_().mul_(grad_sum[:, None])).mul_(upstream[:, None])


def _proportion(upstream: Tensor, token_weights: Tensor) -> Tensor | None:
    """c with upstream = c · token_weights (to rounding), else None; None also where Σ w² = 0 (no
    tokens, or all weights 0: the precomputed gradient says nothing about upstream)."""
    squared_norm = token_weights.square().sum()
    if squared_norm == 0:
        return None
    scale = (upstream * token_weights).sum() / squared_norm
    tolerance = 100 * torch.finfo(upstream.dtype).eps
    return scale if torch.allclose(upstream, scale * token_weights, rtol=tolerance, atol=0.0) else None


class _Divergence(torch.autograd.Function):
    """Σ_v term(log p_v, log q_v) per row, p = softmax of the policy head's logits z, q likewise
    from the target's; streamed.

    With g_v = ∂term/∂log p_v and log p_v = z_v − lse(z): ∂D/∂z_v = g_v − p_v Σ_u g_u. The forward
    keeps lse of both models and Σ_u g_u per token, so the backward is one recomputing pass. Given
    token weights w, the forward also computes the gradient of Σ_t w_t D_t from the tiles it
    holds (as Liger-Kernel's fused losses do); the backward uses it whenever the upstream gradient
    is c·w. The target side gets no gradient.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        target_hidden,
        target_weight,
        target_bias,
        token_weights,
        constants,
        target_constants,
        term,
        chunk_tokens,
        chunk_vocab,
    ):
        ctx.grad_dtypes = _grad_dtypes(weight, bias)
        head = _in_dtype(Head(weight, bias, *constants), hidden.dtype)
        target_head = _in_dtype(Head(target_weight, target_bias, *target_constants), target_hidden.dtype)
        weight = head.weight
        need_grad, need_bias = any(ctx.needs_input_grad[:3]), ctx.needs_input_grad[2]
        precompute = need_grad and token_weights is not None
        acc = _accumulation_dtype(hidden.dtype)
        n, vocab, blocks = hidden.shape[0], _spans(head.vocab_size, chunk_vocab), _spans(hidden.shape[0], chunk_tokens)
        workers = _workers(len(blocks), hidden.device)
        value = torch.zeros(n, dtype=acc, device=hidden.device)
        grad_sum, lse_p, lse_q = torch.zeros_like(value), torch.empty_like(value), torch.empty_like(value)
        if precompute:  # weight rows are shared by all row blocks: one accumulator per worker
            workers = _accumulating_workers(workers, weight, acc)
            grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
            partial_grad_weight = [torch.zeros(weight.shape, dtype=acc, device=weight.device) for _ in range(workers)]
            partial_grad_bias = [
                torch.zeros(head.vocab_size, dtype=acc, device=weight.device)
                for _ in range(workers if need_bias else 0)
            ]

        def row_block(worker, rows):
            # The block's logit tiles are kept (chunk_tokens × V per model) so that the second
            # pass, which needs the final lse, reads them instead of recomputing the matmuls.
            tiles = []
            running_p = running_q = value.new_full((rows.stop - rows.start,), -torch.inf)
            for cols in vocab:
                zp = _tile_logits(hidden[rows], head, cols)
                zq = _tile_logits(target_hidden[rows], target_head, cols)
                running_p = torch.logaddexp(running_p, zp.logsumexp(-1))
                running_q = torch.logaddexp(running_q, zq.logsumexp(-1))
                tiles.append((cols, zp, zq))
            lse_p[rows], lse_q[rows] = running_p, running_q
            for k, (cols, zp, zq) in enumerate(tiles):
                logp, logq = zp.sub_(running_p[:, None]), zq.sub_(running_q[:, None])
                terms, grad = _term_and_grad(term, logp, logq, need_grad)
                value[rows] += terms.sum(-1)
                if need_grad:
                    grad_sum[rows] += grad.sum(-1)
                tiles[k] = (cols, logp, grad)  # log q is spent
            if precompute:
                for cols, logp, grad in tiles:
                    slope = _slope(head, logp, running_p)  # before _logit_grad overwrites log p
                    grad_lin = _times_(_logit_grad(grad, logp, grad_sum[rows], token_weights[rows]), slope)
                    if need_bias:
                        partial_grad_bias[worker][cols] += grad_lin.sum(0)
                    grad_lin = grad_lin.to(hidden.dtype)
                    _add_matmul(grad_hidden[rows], grad_lin, weight[cols])
                    _add_matmul(partial_grad_weight[worker][cols], grad_lin.T, hidden[rows])

        _in_parallel(row_block, blocks, workers)
        ctx.save_for_backward(
            hidden,
            head.weight,
            head.bias,
            target_hidden,
            target_head.weight,
            target_head.bias,
            lse_p,
            lse_q,
            grad_sum,
            token_weights,
        )
        ctx.setup = (constants, target_constants, term, chunk_tokens, chunk_vocab)
        ctx.precomputed = None
        if precompute:
            grad_bias = _sum_into_first(partial_grad_bias) if need_bias else None
            ctx.precomputed = (grad_hidden, _sum_into_first(partial_grad_weight), grad_bias)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        hidden, weight, bias, target_hidden, target_weight, target_bias, lse_p, lse_q, grad_sum, token_weights = (
            ctx.saved_tensors
        )
        constants, target_constants, term, chunk_tokens, chunk_vocab = ctx.setup
        head, target_head = Head(weight, bias, *constants), Head(target_weight, target_bias, *target_constants)
        no_grads = (None,) * 9
        proportion = None if ctx.precomputed is None else _proportion(grad_value, token_weights)
        if proportion is not None:
            grads = [None if grad is None else grad.mul_(proportion) for grad in ctx.precomputed]
            ctx.precomputed = None  # scaled in place: a second backward (retain_graph) recomputes
            dtypes = (hidden.dtype, *ctx.grad_dtypes)
            return *(_cast(grad, dtype) for grad, dtype in zip(grads, dtypes)), *no_grads

        def tile_grad(rows, cols):
            logp = _tile_logits(hidden[rows], head, cols).sub_(lse_p[rows, None])
            logq = _tile_logits(target_hidden[rows], target_head, cols).sub_(lse_q[rows, None])
            _, grad = _term_and_grad(term, logp, logq, need_grad=True)
            slope = _slope(head, logp, lse_p[rows])  # before _logit_grad overwrites log p
            return _times_(_logit_grad(grad, logp, grad_sum[rows], grad_value[rows]), slope)

        return *_backprop_tiles(ctx, hidden, head, tile_grad, chunk_tokens, chunk_vocab), *no_grads


def divergence(
    name: str,
    hidden: Tensor,
    head: Head | Tensor,
    target_hidden: Tensor,
    target_head: Head | Tensor,
    *,
    token_weights: Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
    **params: Any,
) -> Tensor:
    """Exact D(πθ‖q) per token, πθ = softmax(head.logits(hidden)), q = softmax(target_head.logits(
    target_hidden)), for any closed-form divergence of ``divrl.divergences`` (``name``, ``params``
    as in ``divrl.divergences.get``). A bare weight stands for Head(weight).

    hidden (N, H), head over (V, H), target_hidden (N, H'), target_head over (V, H') → (N,); the
    target may have another hidden size (a teacher) but the same vocabulary. Differentiable
    w.r.t. hidden, weight and bias; the target side is detached: q is a constant of the loss, as for
    a reference model or a teacher. The divergence is D = Σ_v pointwise(name)(log p_v, log q_v), the
    same term ``divrl.divergences`` sums, so both agree to rounding (float64: 1e-14).

    ``token_weights`` (N,), optional, is a promise about the loss: when the values are backpropagated
    as c · Σ_t w_t D_t for some scalar c (``.mean()`` is w = 1), the gradient is computed during
    the forward, from tiles in hand: four logits matmuls instead of six and one evaluation of the
    term's gradient instead of two, for one weight-sized buffer per thread. Any other upstream
    gradient still gets the exact one, recomputed.
    """
    head, target_head = _as_head(head, 1.0), _as_head(target_head, 1.0).detach()
    if hidden.shape[0] != target_hidden.shape[0] or head.vocab_size != target_head.vocab_size:
        raise ValueError(
            f"policy and target must share tokens and vocabulary: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(head.weight.shape)}, target_hidden {tuple(target_hidden.shape)}, "
            f"target_weight {tuple(target_head.weight.shape)}"
        )
    term = divergences.pointwise(name, **params)
    hidden = hidden.to(_compute_dtype(hidden, head))
    target_hidden = target_hidden.detach().to(_compute_dtype(target_hidden, target_head))
    if token_weights is not None:
        token_weights = token_weights.detach().to(_accumulation_dtype(hidden.dtype)).expand(hidden.shape[0])
    with _autocast_off(hidden.device):
        return _Divergence.apply(
            hidden,
            head.weight,
            head.bias,
            target_hidden,
            target_head.weight,
            target_head.bias,
            token_weights,
            _constants(head),
            _constants(target_head),
            term,
            chunk_tokens,
            chunk_vocab,
        )
