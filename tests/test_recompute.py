"""Activation checkpointing (`divrl.recompute`, config key `activation_checkpointing`): the same
hidden states, gradients and trained weights as keeping the activations, far fewer tensors saved
for the backward, and models whose cache cannot give a recomputed block its KV again refused."""

import pytest
import torch
import transformers

from divrl.config import ConfigError
from divrl.hidden import completion_hidden
from divrl.recompute import recomputed_activations, refusal
from divrl.sharding import blocks
from divrl.trainer import Trainer
from test_head import COMMON
from test_lora import tiny_cfg as lora_cfg
from test_trainer import tiny_cfg


def _forward_backward(model, pad_token_id):
    """Hidden states and parameter gradients of a loss on 2 prompts × 3 ragged completions, and the
    bytes autograd saved for the backward during the forward."""
    model.zero_grad(set_to_none=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    completions = [[12, 13, 14], [15], [16, 17, 18, 19, 20], [21, 22], [23, 24, 25, 26], [27]]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = completion_hidden(model, prompts, completions, pad_token_id, bucket_overhead=1)
    out.hidden.pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.hidden.detach(), grads, sum(saved)


def test_recomputed_blocks_give_the_same_hidden_states_and_gradients(tiny, hidden_path):
    model, tokenizer = tiny
    kept_hidden, kept_grads, kept_bytes = _forward_backward(model, tokenizer.pad_token_id)
    with recomputed_activations(model):
        hidden, grads, saved_bytes = _forward_backward(model, tokenizer.pad_token_id)
    assert all("forward" not in block.__dict__ for block in blocks(model)), "a block kept the wrapper"
    torch.testing.assert_close(hidden, kept_hidden, rtol=0, atol=0)
    assert grads.keys() == kept_grads.keys() and len(grads) > 10
    for name, grad in kept_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    # the blocks keep their inputs only; what autograd still saves is outside them
    assert saved_bytes < kept_bytes / 4, (saved_bytes, kept_bytes)


@pytest.mark.parametrize("make_cfg", [tiny_cfg, lora_cfg], ids=["full", "lora"])
def test_a_training_step_is_the_same_with_activation_checkpointing(tmp_path, say_task, make_cfg):
    """A reward that varies within groups (the parity of the completion's length), so the policy
    gradient moves the weights (LoRA's adapters start as a no-op, and its reference is the base)."""
    task = say_task(range(20), "parity")
    weights = {}
    for checkpointing in (False, True):
        cfg = make_cfg(
            tmp_path / str(checkpointing), *task, "steps=1", "kl_coef=0.1", f"activation_checkpointing={checkpointing}"
        )
        trainer = Trainer(cfg, log=lambda *_: None)
        before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
        trainer.train_step(0)
        weights[checkpointing] = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if k in before}
        assert any(not torch.equal(weights[checkpointing][k], before[k]) for k in before), "nothing trained"
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-5, atol=1e-7, msg=name)


def _tiny_gemma2(vocab_size: int) -> transformers.PreTrainedModel:
    """A tiny Gemma 2 (test_head's sizes): its layers alternate sliding-window and full attention."""
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**{**COMMON, "vocab_size": vocab_size}, head_dim=8))


def test_a_model_with_sliding_window_layers_is_refused_naming_the_key(tmp_path, tiny):
    _, tokenizer = tiny
    assert refusal(tiny[0]) is None
    model = _tiny_gemma2(len(tokenizer))
    assert "DynamicSlidingWindowLayer" in (refusal(model) or "")
    model.save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    cfg = tiny_cfg(tmp_path, f"model={tmp_path / 'gemma2'}", "activation_checkpointing=true")
    with pytest.raises(ConfigError, match="config key 'activation_checkpointing': Gemma2ForCausalLM has attention"):
        Trainer(cfg, log=lambda *_: None)
