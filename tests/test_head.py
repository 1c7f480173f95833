"""divrl.models.output_head and verify_head on tiny random models whose heads differ (an lm_head
bias, a final softcap, a logit divisor, a logit scale, none): the head reproduces the model's
logits, chunked log-probs through it equal log_softmax of those logits, and a model whose logits
cannot be reproduced is refused."""

import re

import pytest
import torch
import transformers

from divrl import chunked
from divrl.models import ModelLoadError, output_head, verify_head

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.2,
)  # logits of a few nats, so that every head feature matters
MODELS = {
    "phi": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(**COMMON)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=2.0)
    ),
    "granite": lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(**COMMON, logits_scaling=4.0)),
    "cohere": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**COMMON, logit_scale=0.25)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
}


def tiny(name: str):
    torch.manual_seed(0)
    model = MODELS[name]()
    if model.lm_head.bias is not None:  # initialized to zeros: make it matter
        torch.nn.init.normal_(model.lm_head.bias)
    return model.eval()


@pytest.mark.parametrize("name", MODELS)
def test_output_head_reproduces_the_models_log_probs(name):
    model = tiny(name)
    verify_head(model)
    ids = torch.tensor([[1, 17, 42, 5, 96, 33, 8, 60, 71, 2]])
    with torch.no_grad():
        logits = model(ids).logits[0]
        hidden = model.base_model(ids).last_hidden_state[0]
    tokens = ids[0].roll(-1)
    logp, entropy = chunked.logprob_entropy(hidden, output_head(model), tokens, chunk_tokens=4, chunk_vocab=40)
    want = torch.log_softmax(logits, -1)
    torch.testing.assert_close(logp, want.gather(-1, tokens[:, None]).squeeze(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, -(want.exp() * want).sum(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["phi", "gemma2", "granite", "cohere"])
def test_the_bare_weight_is_not_these_models_head(name):
    """The defect the head fixes: hidden @ weight.T alone misses bias, softcap or scale by > 0.1."""
    model = tiny(name)
    with pytest.raises(ModelLoadError, match=rf"{type(model).__name__}: ") as refused:
        verify_head(model, chunked.Head(model.lm_head.weight))
    assert float(re.search(r"\|Δ logit\| = ([0-9.e+-]+)", str(refused.value)).group(1)) > 0.1


def test_the_heads_read_from_each_config():
    heads = {name: output_head(tiny(name)) for name in MODELS}
    assert heads["gemma2"].softcap == 2.0 and heads["gemma2"].scale == 1.0
    assert heads["granite"].scale == 0.25 and heads["granite"].softcap is None
    assert heads["cohere"].scale == 0.25 and heads["cohere"].softcap is None
    assert heads["phi"].bias is not None and heads["phi"].bias.shape == (97,)
    llama = heads["llama"]
    assert llama.bias is None and llama.scale == 1.0 and llama.softcap is None and llama.temperature == 1.0


class ShiftedLlama(transformers.LlamaForCausalLM):
    """Adds 1 to the first vocabulary entry's logit: no Head over its hidden states reproduces it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits[..., 0] += 1.0
        return out


def test_a_model_whose_logits_cannot_be_reproduced_is_refused():
    torch.manual_seed(0)
    model = ShiftedLlama(transformers.LlamaConfig(**COMMON)).train()
    with pytest.raises(ModelLoadError, match=r"ShiftedLlama: .*\|Δ logit\| = 1 .*different distribution"):
        verify_head(model)
    assert model.training  # the mode is restored


def test_verify_head_restores_eval_mode_and_takes_a_probe():
    model = tiny("llama")
    verify_head(model, probe_ids=torch.tensor([3, 1, 4, 1, 5]))
    assert not model.training
