"""Packed attention (`divrl.packing`): each row attends causally over its own keys, whatever the
bucketing, with gradients; which models pack; packed and KV-cache forwards agree."""

import pytest
import torch
import transformers

from divrl import attention, packing
from divrl.hidden import completion_hidden
from test_head import COMMON

# Two prompts (positions 0–2 and 3–4), then completions of prompt 0 (5–6) and prompt 1 (7).
ROWS = [([0, 1, 2], 0), ([3, 4], 0), ([0, 1, 2, 5, 6], 3), ([3, 4, 7], 2)]


def test_layout_masks_each_row_causally_over_its_context_and_its_own_keys():
    layout = packing.layout(ROWS, [[0, 1, 2, 3]], "cpu")
    (bucket,) = layout.buckets
    assert bucket.mask.shape == (4, 1, 3, 5)  # 4 rows × 3 queries × 5 keys
    mask = bucket.mask[:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert mask[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]  # a padded query sees key 0 only
    assert mask[2] == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]  # the prompt, then itself
    assert mask[3] == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert bucket.keys.view(4, 5)[2].tolist() == [0, 1, 2, 5, 6]
    assert bucket.queries.view(4, 3)[3].tolist() == [7, 0, 0]
    assert layout.order.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # rows given in packed order
    with pytest.raises(ValueError, match="cover the packed positions"):
        packing.layout([*ROWS, ([0, 1, 2, 5], 3)], [[0, 1, 2, 3, 4]], "cpu")  # position 5 queried twice


def _row_by_row(q, k, v, scale):
    """Each row's attention on its own: softmax(q kᵀ · scale + causal mask over its keys) v."""
    out = torch.empty(q.shape[2], q.shape[1], q.shape[3])
    groups = q.shape[1] // k.shape[1]
    for keys, context in ROWS:
        rq = q[0][:, keys[context:]]
        rk, rv = (x[0][:, keys].repeat_interleave(groups, 0) for x in (k, v))
        scores = rq @ rk.transpose(-1, -2) * scale
        seen = torch.arange(len(keys))[None, :] <= context + torch.arange(len(keys) - context)[:, None]
        out[keys[context:]] = (scores.masked_fill(~seen, -torch.inf).softmax(-1) @ rv).transpose(0, 1)
    return out[None]


@pytest.mark.parametrize("buckets", [[[0, 1, 2, 3]], [[0], [1], [2], [3]], [[2, 0], [3, 1]]])
def test_packed_attention_is_each_rows_own_attention(buckets):
    """Grouped-query heads (4 query heads on 2 KV heads), values and gradients of q, k and v."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 8, 16, generator=generator, requires_grad=True) for h in (4, 2, 2))
    out = packing.attend(q, k, v, packing.layout(ROWS, buckets, "cpu"), scaling=0.25)
    expected = _row_by_row(q, k, v, 0.25)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn(expected.shape, generator=generator)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_only_plain_full_sdpa_attention_packs(tiny, monkeypatch):
    model, _ = tiny
    assert model.config._attn_implementation == attention.SDPA and attention.plain_sdpa(model)  # as loaded
    assert attention.plain_sdpa(attention.use(model, "float32"))
    monkeypatch.setattr(model.config, "_attn_implementation", "sdpa")  # transformers' own: no layout
    assert not attention.plain_sdpa(model)
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    assert not attention.plain_sdpa(model)
    monkeypatch.setattr(model.config, "_attn_implementation", attention.SDPA)
    monkeypatch.setattr(model.config, "attn_logit_softcapping", 50.0, raising=False)
    assert not attention.plain_sdpa(model)
    mistral = transformers.MistralForCausalLM(  # sliding-window attention
        transformers.MistralConfig(**COMMON, sliding_window=4, attn_implementation="sdpa")
    )
    assert not attention.plain_sdpa(attention.use(mistral))


def test_float32_sdpa_attends_a_packed_layout_in_float32():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 8, 16, generator=generator).bfloat16() for h in (4, 2, 2))
    layout = packing.layout(ROWS, [[0, 1, 2, 3]], "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention._sdpa_in_float32(torch.nn.Module(), q, k, v, None, scaling=0.25, divrl_layout=layout)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _row_by_row(q.float(), k.float(), v.float(), 0.25).bfloat16())


@pytest.mark.parametrize("attention_dtype", ["float32", "bfloat16"])
def test_packed_and_cached_forwards_agree_under_bf16_autocast(tiny, monkeypatch, attention_dtype):
    """Under bf16 autocast the packed path computes attention in the dtype `attention_dtype` chose,
    as the KV-cache path does with the same attention function: the two agree to bf16 rounding."""
    model, tokenizer = tiny
    monkeypatch.setattr(model.config, "_attn_implementation", model.config._attn_implementation)  # restored after
    assert attention.plain_sdpa(attention.use(model, attention_dtype))
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13], [14, 15], [16, 17, 18]]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = completion_hidden(model, prompts, completions, tokenizer.pad_token_id).hidden
        monkeypatch.setattr(attention, "plain_sdpa", lambda model: False)
        cached = completion_hidden(model, prompts, completions, tokenizer.pad_token_id).hidden
    assert packed.dtype == cached.dtype
    torch.testing.assert_close(packed.float(), cached.float(), atol=3e-2, rtol=3e-2)
