"""Exact per-token log-probs, entropies and divergences straight from hidden states.

The logits z = hidden @ weight.T / temperature of N tokens over a vocabulary of V are never built
whole. They are computed tile by tile (``chunk_tokens`` rows × ``chunk_vocab`` columns), reduced
with an online log-sum-exp (Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax"), and recomputed tile by tile in a custom backward (``torch.autograd.Function``), so
gradients need no stored logits either.

Memory besides the inputs and their gradients: a few tiles per worker thread, and in the forward
of ``divergence`` the tiles of one row block (chunk_tokens × V per model per worker, 2 × 2 × 128 ×
49152 × 4 B ≈ 100 MB with the defaults) so that its second pass need not redo the matmuls; with
``token_weights``, also one weight-gradient accumulator per worker thread.

Work: ``logprob_entropy`` does one logits matmul forward and three backward (recompute, ∂hidden,
∂weight) against one and two for full logits; ``divergence`` two forward (policy, target) and four
backward against two and two, or with ``token_weights`` four in the forward and none backward,
like full logits. The extra matmuls are the price of no stored logits; on CPU it is more than
paid back by elementwise work on cache-sized tiles instead of (N, V) tensors
(benchmarks/chunked_divergence.py). Tiles run on Python threads with single-threaded ops (see
``_in_parallel``).

Dtypes: everything runs in the dtype it is given; log-sum-exps, sums and the returned values use
at least float32 (bfloat16/float16 inputs give float32 outputs; gradients come back in the
input's dtype). Measured against float64 on the same (rounded) inputs, N = 64, V = 49152,
H = 576, norm-wise relative error over tokens — float32: values ≤ 1.1e-6, gradients ≤ 4.2e-6
(reverse/forward KL, JSD, log-prob, entropy), the same as float32 full logits; bfloat16: values
≤ 1.1e-3 (sampled log-probs 6.6e-5), gradients ≤ 1.7e-2, set by the bfloat16 logits and again the
same as bfloat16 full logits. float64 matches the full computation to ~1e-14 (tested to 1e-6).
"""

from concurrent.futures import ThreadPoolExecutor

import torch

from divrl import divergences

DEFAULT_CHUNK_TOKENS = 128
DEFAULT_CHUNK_VOCAB = 2048  # a 128 × 2048 float32 tile is 1 MiB: elementwise work stays in cache


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _in_compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and weight in one dtype: autocast's when it is on for their device (what hidden @
    weight.T would use there), else their promoted dtype; the casts are differentiable."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype)


def _autocast_off(device: torch.device):
    """Tiles compute in the dtype they are given, on whichever thread runs them (autocast is
    per thread: worker threads never have it)."""
    return torch.autocast(device.type, enabled=False)


def _spans(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """One tile z = hidden @ weight.T / T, upcast to the accumulation dtype."""
    z = (hidden @ weight.T).to(_accumulation_dtype(hidden.dtype))
    return z if inv_temperature == 1.0 else z.mul_(inv_temperature)


def _workers(n_items: int, device: torch.device) -> int:
    """CPU: one Python thread per intra-op thread; accelerators queue their own work: one."""
    return max(1, min(torch.get_num_threads(), n_items)) if device.type == "cpu" else 1


def _in_parallel(task, items, workers: int) -> None:
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

    def run(worker):
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


def _add_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, in place when the dtypes allow (float32/64), else through a temporary."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b


def _sum_into_first(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ tensors in a fixed order, written into the first (per-thread partial sums)."""
    for tensor in tensors[1:]:
        tensors[0] += tensor
    return tensors[0]


def _backprop_tiles(ctx, hidden, weight, tile_grad, chunk_tokens, chunk_vocab):
    """Gradients of hidden and weight given dL/dz tile by tile.

    ``tile_grad(rows, cols)`` returns dL/dz for that tile already divided by the temperature, so
    grad_hidden[rows] += G @ weight[cols] and grad_weight[cols] += Gᵀ @ hidden[rows]. Threads take
    whole vocabulary chunks (their grad_weight rows are theirs alone) and sum grad_hidden apart.
    """
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    acc = _accumulation_dtype(hidden.dtype)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    vocab = _spans(weight.shape[0], chunk_vocab)
    workers = _workers(len(vocab), hidden.device)
    partial_grad_hidden = [
        torch.zeros(hidden.shape, dtype=acc, device=hidden.device) for _ in range(workers if need_hidden else 0)
    ]

    def vocab_chunk(worker, cols):
        for rows in _spans(hidden.shape[0], chunk_tokens):
            grad_z = tile_grad(rows, cols).to(hidden.dtype)
            if need_hidden:
                _add_matmul(partial_grad_hidden[worker][rows], grad_z, weight[cols])
            if need_weight:
                _add_matmul(grad_weight[cols], grad_z.T, hidden[rows])

    with _autocast_off(hidden.device):
        _in_parallel(vocab_chunk, vocab, workers)
    grad_hidden = _sum_into_first(partial_grad_hidden) if need_hidden else None
    return (
        None if grad_hidden is None else grad_hidden.to(hidden.dtype),
        None if grad_weight is None else grad_weight.to(weight.dtype),
    )


def _merge_entropies(lse_a, entropy_a, lse_b, entropy_b):
    """Log-normalizer and entropy of a distribution split over two disjoint vocabulary parts.

    With mass w_k = exp(lse_k − lse) on part k: H = Σ_k w_k H_k − Σ_k w_k log w_k.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    log_wa, log_wb = lse_a - lse, lse_b - lse
    wa, wb = log_wa.exp(), log_wb.exp()
    return lse, wa * (entropy_a - log_wa) + wb * (entropy_b - log_wb)


def _chunk_lse_entropy(z: torch.Tensor):
    """log Σ e^z and the entropy of softmax(z) along the last dim, one pass over the tile."""
    shift = z.amax(-1, keepdim=True)
    y = z - shift
    e = y.exp()
    mass = e.sum(-1)
    log_mass = mass.log()
    return shift.squeeze(-1) + log_mass, log_mass - (e * y).sum(-1) / mass


class _LseEntropy(torch.autograd.Function):
    """(log Σ_v e^{z_v}, H(softmax z)) per row of z = hidden @ weight.T / T, streamed.

    Backward: ∂lse/∂z_v = p_v and ∂H/∂z_v = −p_v (log p_v + H).
    """

    @staticmethod
    def forward(ctx, hidden, weight, inv_temperature, chunk_tokens, chunk_vocab):
        acc = _accumulation_dtype(hidden.dtype)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        entropy = torch.empty_like(lse)

        def row_block(_, rows):
            state = None
            for cols in _spans(weight.shape[0], chunk_vocab):
                chunk = _chunk_lse_entropy(_logits(hidden[rows], weight[cols], inv_temperature))
                state = chunk if state is None else _merge_entropies(*state, *chunk)
            lse[rows], entropy[rows] = state

        blocks = _spans(hidden.shape[0], chunk_tokens)
        _in_parallel(row_block, blocks, _workers(len(blocks), hidden.device))
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) costs nothing
        ctx.save_for_backward(hidden, weight, lse, entropy)
        ctx.setup = (inv_temperature, chunk_tokens, chunk_vocab)
        return lse, entropy

    @staticmethod
    def backward(ctx, grad_lse, grad_entropy):
        if grad_lse is None and grad_entropy is None:
            return None, None, None, None, None
        hidden, weight, lse, entropy = ctx.saved_tensors
        inv_temperature, chunk_tokens, chunk_vocab = ctx.setup

        def tile_grad(rows, cols):
            logp = _logits(hidden[rows], weight[cols], inv_temperature).sub_(lse[rows, None])
            prob = logp.exp()
            if grad_entropy is None:
                coefficient = grad_lse[rows, None]
            else:
                coefficient = logp.add_(entropy[rows, None]).mul_(-grad_entropy[rows, None])
                if grad_lse is not None:
                    coefficient += grad_lse[rows, None]
            prob.mul_(coefficient)
            return prob if inv_temperature == 1.0 else prob.mul_(inv_temperature)

        grads = _backprop_tiles(ctx, hidden, weight, tile_grad, chunk_tokens, chunk_vocab)
        return *grads, None, None, None


def logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token log-prob and entropy of p = softmax(hidden @ weight.T / temperature).

    hidden (N, H), weight (V, H), tokens (N,) → (log p[tokens] (N,), H(p) (N,) in nats), both
    differentiable w.r.t. hidden and weight. log p[y] = z_y − logsumexp(z); the entropy is
    merged across vocabulary chunks as H = Σ_k w_k H_k − Σ_k w_k log w_k (w_k: mass of chunk k).
    The (N, V) logits are never built.
    """
    hidden, weight = _in_compute_dtype(hidden, weight)
    inv_temperature = 1.0 / temperature
    acc = _accumulation_dtype(hidden.dtype)
    with _autocast_off(hidden.device):
        sampled_logit = (hidden.to(acc) * weight[tokens].to(acc)).sum(-1) * inv_temperature
        lse, entropy = _LseEntropy.apply(hidden, weight, inv_temperature, chunk_tokens, chunk_vocab)
    return sampled_logit - lse, entropy


def _term_and_grad(term, logp, logq, need_grad: bool):
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


def _proportion(upstream: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor | None:
    """c with upstream = c · token_weights (to rounding), else None."""
    scale = (upstream * token_weights).sum() / token_weights.square().sum()
    tolerance = 100 * torch.finfo(upstream.dtype).eps
    return scale if torch.allclose(upstream, scale * token_weights, rtol=tolerance, atol=0.0) else None


class _Divergence(torch.autograd.Function):
    """Σ_v term(log p_v, log q_v) per row, p = softmax(hidden @ weight.T), q likewise; streamed.

    With g_v = ∂term/∂log p_v and log p_v = z_v − lse(z): ∂D/∂z_v = g_v − p_v Σ_u g_u. The forward
    keeps lse of both models and Σ_u g_u per token, so the backward is one recomputing pass. Given
    token weights w, the forward also computes the gradient of Σ_t w_t D_t from the tiles it
    holds (as Liger-Kernel's fused losses do); the backward uses it whenever the upstream gradient
    is c·w. The target side gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target_hidden, target_weight, token_weights, term, chunk_tokens, chunk_vocab):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        precompute = need_grad and token_weights is not None
        acc = _accumulation_dtype(hidden.dtype)
        n, vocab, blocks = hidden.shape[0], _spans(weight.shape[0], chunk_vocab), _spans(hidden.shape[0], chunk_tokens)
        workers = _workers(len(blocks), hidden.device)
        value = torch.zeros(n, dtype=acc, device=hidden.device)
        grad_sum, lse_p, lse_q = torch.zeros_like(value), torch.empty_like(value), torch.empty_like(value)
        if precompute:  # weight rows are shared by all row blocks: one accumulator per worker
            grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
            partial_grad_weight = [torch.zeros(weight.shape, dtype=acc, device=weight.device) for _ in range(workers)]

        def row_block(worker, rows):
            # The block's logit tiles are kept (chunk_tokens × V per model) so that the second
            # pass, which needs the final lse, reads them instead of recomputing the matmuls.
            tiles = []
            running_p = running_q = value.new_full((rows.stop - rows.start,), -torch.inf)
            for cols in vocab:
                zp = _logits(hidden[rows], weight[cols], 1.0)
                zq = _logits(target_hidden[rows], target_weight[cols], 1.0)
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
                    grad_z = _logit_grad(grad, logp, grad_sum[rows], token_weights[rows]).to(hidden.dtype)
                    _add_matmul(grad_hidden[rows], grad_z, weight[cols])
                    _add_matmul(partial_grad_weight[worker][cols], grad_z.T, hidden[rows])

        _in_parallel(row_block, blocks, workers)
        ctx.save_for_backward(hidden, weight, target_hidden, target_weight, lse_p, lse_q, grad_sum, token_weights)
        ctx.setup = (term, chunk_tokens, chunk_vocab)
        ctx.precomputed = (grad_hidden, _sum_into_first(partial_grad_weight)) if precompute else None
        return value

    @staticmethod
    def backward(ctx, grad_value):
        hidden, weight, target_hidden, target_weight, lse_p, lse_q, grad_sum, token_weights = ctx.saved_tensors
        term, chunk_tokens, chunk_vocab = ctx.setup
        no_grads = (None,) * 6
        scale = None if ctx.precomputed is None else _proportion(grad_value, token_weights)
        if scale is not None:
            grad_hidden, grad_weight = (g.mul_(scale) for g in ctx.precomputed)
            ctx.precomputed = None  # scaled in place: a second backward (retain_graph) recomputes
            return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), *no_grads

        def tile_grad(rows, cols):
            logp = _logits(hidden[rows], weight[cols], 1.0).sub_(lse_p[rows, None])
            logq = _logits(target_hidden[rows], target_weight[cols], 1.0).sub_(lse_q[rows, None])
            _, grad = _term_and_grad(term, logp, logq, need_grad=True)
            return _logit_grad(grad, logp, grad_sum[rows], grad_value[rows])

        return *_backprop_tiles(ctx, hidden, weight, tile_grad, chunk_tokens, chunk_vocab), *no_grads


def divergence(
    name: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_hidden: torch.Tensor,
    target_weight: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
    **params,
) -> torch.Tensor:
    """Exact D(πθ‖q) per token, πθ = softmax(hidden @ weight.T), q = softmax(target_hidden @
    target_weight.T), for any closed-form divergence of ``divrl.divergences`` (``name``, ``params``
    as in ``divrl.divergences.get``).

    hidden (N, H), weight (V, H), target_hidden (N, H'), target_weight (V, H') → (N,); the
    target may have another hidden size (a teacher) but the same vocabulary. Differentiable
    w.r.t. hidden and weight; the target side is detached: q is a constant of the loss, as for a
    reference model or a teacher. The divergence is D = Σ_v pointwise(name)(log p_v, log q_v), the
    same term ``divrl.divergences`` sums, so both agree to rounding (float64: 1e-14).

    ``token_weights`` (N,), optional, is a promise about the loss: when the values are backpropagated
    as c · Σ_t w_t D_t for some scalar c (``.mean()`` is w = 1), the gradient is computed during
    the forward, from tiles in hand: four logits matmuls instead of six and one evaluation of the
    term's gradient instead of two, for one weight-sized buffer per thread. Any other upstream
    gradient still gets the exact one, recomputed.
    """
    if hidden.shape[0] != target_hidden.shape[0] or weight.shape[0] != target_weight.shape[0]:
        raise ValueError(
            f"policy and target must share tokens and vocabulary: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}, target_hidden {tuple(target_hidden.shape)}, "
            f"target_weight {tuple(target_weight.shape)}"
        )
    term = divergences.pointwise(name, **params)
    hidden, weight = _in_compute_dtype(hidden, weight)
    target_hidden, target_weight = _in_compute_dtype(target_hidden.detach(), target_weight.detach())
    if token_weights is not None:
        token_weights = token_weights.detach().to(_accumulation_dtype(hidden.dtype)).expand(hidden.shape[0])
    with _autocast_off(hidden.device):
        return _Divergence.apply(
            hidden, weight, target_hidden, target_weight, token_weights, term, chunk_tokens, chunk_vocab
        )
