"""divrl.chunked equals the full-logits computation (float64), values and gradients."""

import pytest
import torch

from divrl.chunked import logprob_entropy

N, V, H = 13, 37, 5
CHUNKS = dict(chunk_tokens=4, chunk_vocab=10)  # smaller than N and V, not dividing them


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, dtype=torch.float64, generator=gen).requires_grad_()
    weight = torch.randn(V, H, dtype=torch.float64, generator=gen).requires_grad_()
    tokens = torch.randint(0, V, (N,), generator=gen)
    return hidden, weight, tokens


def full_logprob_entropy(hidden, weight, tokens, temperature=1.0):
    logp = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    return logp.gather(-1, tokens[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_entropy_matches_full_logits(inputs, temperature):
    hidden, weight, tokens = inputs
    chunked = logprob_entropy(hidden, weight, tokens, temperature=temperature, **CHUNKS)
    full = full_logprob_entropy(hidden, weight, tokens, temperature)
    # a loss that mixes both outputs, so every backward branch carries weight
    mix = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)
    grads = [
        torch.autograd.grad((lp * mix + ent * mix.flip(0)).sum(), (hidden, weight))
        for lp, ent in (chunked, full)
    ]
    for got, want in zip([*chunked, *grads[0]], [*full, *grads[1]]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_logprob_entropy_gradcheck(inputs):
    hidden, weight, tokens = inputs
    assert torch.autograd.gradcheck(
        lambda h, w: logprob_entropy(h, w, tokens, temperature=0.9, **CHUNKS), (hidden, weight)
    )


def test_logprob_entropy_is_a_distribution_summary(inputs):
    """log-probs of all tokens sum (in prob) to 1; entropy lies in [0, log V]."""
    hidden, weight, _ = inputs
    every_token = torch.arange(V).repeat_interleave(2)
    logp, entropy = logprob_entropy(hidden[:2].repeat(V, 1), weight, every_token, **CHUNKS)
    total = logp.view(V, 2).exp().sum(0)
    torch.testing.assert_close(total, torch.ones(2, dtype=torch.float64))
    assert (entropy >= 0).all() and (entropy <= torch.log(torch.tensor(float(V)))).all()
