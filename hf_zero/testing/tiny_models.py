"""Tiny Llama, GPT-2 (tied embeddings) and BERT masked-LM models, and deterministic batches.

Dropout is off so sharded and unsharded runs compute the same function; every sequence has the
same number of labelled tokens so per-rank mean losses average to the global-batch mean.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

VOCAB = 256
SEQ_LEN = 16
MASKED_PER_SEQUENCE = 4
MODEL_NAMES = ("llama", "gpt2", "bert")


def build_model(name: str, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised tiny model of architecture `name`, identical for equal seeds."""
    torch.manual_seed(seed)
    if name == "llama":
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config)
    if name == "gpt2":
        config = GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return GPT2LMHeadModel(config)
    if name == "bert":
        config = BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertForMaskedLM(config)
    raise ValueError(f"unknown tiny model {name!r}; choose from {MODEL_NAMES}")


def make_samples(name: str, count: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """`count` training samples for model `name` (causal LM for llama/gpt2, masked LM for bert)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (count, SEQ_LEN), generator=generator)
    if name != "bert":
        return {"input_ids": tokens, "labels": tokens.clone()}
    order = torch.rand(count, SEQ_LEN, generator=generator).argsort(dim=1)
    masked = torch.zeros(count, SEQ_LEN, dtype=torch.bool)
    masked.scatter_(1, order[:, :MASKED_PER_SEQUENCE], True)
    labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
    inputs = torch.where(masked, torch.zeros_like(tokens), tokens)  # token 0 plays [MASK]
    return {"input_ids": inputs, "labels": labels}


def slice_samples(samples: dict[str, torch.Tensor], start: int, count: int) -> dict[str, torch.Tensor]:
    """Samples `start` .. `start + count - 1` as a batch."""
    return {key: value[start : start + count] for key, value in samples.items()}
