"""Tiny models and deterministic batches for the sharded-vs-unsharded checks.

Hub architectures built from configs (no downloads): Llama, GPT-2 (tied embeddings), BERT
masked LM, a Llama whose three layers are one shared layer under reentrant activation
checkpointing (each shared parameter's gradient hook fires three times per backward pass), a Llama
under non-reentrant activation checkpointing, a five-layer Llama, GPT-2 with a `peft` LoRA adapter (frozen base), and
`beam`, a mixture-of-experts model whose router the model keeps in fp32, and a Mixtral (top-2 of 4
experts). Plus `branches`, a small
network that sends each micro-batch through one of two equally sized branches chosen by the data,
so ranks use different parameters.

The data are sequences from a sparse Markov chain (`hf_zero.cli.data.markov_corpus`), so the loss
really falls. Dropout is off so sharded and unsharded runs compute the same function; every
sequence has the same number of labelled tokens so per-micro-batch mean losses average to the
global-batch mean.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)
from transformers.modeling_outputs import CausalLMOutput

from ..cli.data import markov_corpus

VOCAB = 256
SEQ_LEN = 16
MASKED_PER_SEQUENCE = 4
ROUTE_BLOCK = 2  # consecutive samples that take the same branch of the `branches` model
MODEL_NAMES = ("llama", "gpt2", "bert")
EXTRA_MODEL_NAMES = (
    "llama-shared",
    "llama-ckpt",
    "llama-deep",
    "fp32-norms",
    "gpt2-lora",
    "beam",
    "mixtral",
    "branches",
)


def llama_config(layers: int = 2) -> LlamaConfig:
    """The tiny Llama's config with `layers` layers."""
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )


class BranchNet(nn.Module):
    """Embedding, a shared trunk, one of two branches picked per micro-batch by `route`, and a head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.trunk = nn.Linear(width, width)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)) for _ in range(2)
        )
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, route: torch.Tensor) -> CausalLMOutput:
        hidden = torch.tanh(self.trunk(self.embed(input_ids)))
        hidden = self.branches[int(route[0])](hidden)
        logits = self.head(hidden)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


class Fp32NormBlock(nn.Module):
    """A residual block whose norm computes in fp32 whatever the other weights' dtype."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden.to(self.norm.weight.dtype)).to(hidden.dtype)
        return hidden + torch.tanh(self.proj(normed))


class Fp32NormNet(nn.Module):
    """Blocks whose norms a model keeps in fp32 under bf16 (`_keep_in_fp32_modules_strict`, as
    `from_pretrained` honours it): every unit holds parameters of two compute dtypes."""

    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["norm"]
    _no_split_modules: ClassVar[list[str]] = ["Fp32NormBlock"]

    def __init__(self, width: int = 128, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(Fp32NormBlock(width) for _ in range(layers))
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> CausalLMOutput:
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden)
        logits = self.head(hidden)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
        )
        return CausalLMOutput(loss=loss, logits=logits)


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model of architecture `name`, identical for equal seeds."""
    torch.manual_seed(seed)
    if name == "llama":
        return LlamaForCausalLM(llama_config())
    if name == "llama-shared":
        model = LlamaForCausalLM(llama_config(layers=3))
        model.model.layers[1] = model.model.layers[2] = model.model.layers[0]
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        model.config.use_cache = False
        return model.train()
    if name == "fp32-norms":
        return Fp32NormNet()
    if name == "llama-deep":  # enough layers that "a unit or two gathered at once" is a real bound
        return LlamaForCausalLM(llama_config(layers=5))
    if name == "llama-ckpt":
        model = LlamaForCausalLM(llama_config())
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return model.train()
    if name == "gpt2-lora":
        from peft import LoraConfig, get_peft_model

        base = build_model("gpt2", seed)
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
        )
        return get_peft_model(base, lora)
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
    if name == "beam":
        config = AutoConfig.for_model(
            "beam",
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            layer_types=["sliding_attention", "full_attention"],
            mlp_layer_types=["dense", "sparse"],
            sliding_window=8,
        )
        return AutoModelForCausalLM.from_config(config)
    if name == "mixtral":  # top-2 of 4 experts (fused into one tensor per layer), no router noise
        config = MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            router_jitter_noise=0.0,
        )
        return MixtralForCausalLM(config)
    if name == "branches":
        return BranchNet()
    raise ValueError(f"unknown tiny model {name!r}; choose from {MODEL_NAMES + EXTRA_MODEL_NAMES}")


def make_samples(name: str, count: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """`count` training samples for model `name` (causal LM, masked LM for bert, routed for branches)."""
    tokens = markov_corpus(count, SEQ_LEN, VOCAB, branching=4, seed=seed)
    if name == "branches":
        route = (torch.arange(count) // ROUTE_BLOCK) % 2
        return {"input_ids": tokens, "labels": tokens.clone(), "route": route}
    if name != "bert":  # causal LMs, the LoRA one included
        return {"input_ids": tokens, "labels": tokens.clone()}
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(count, SEQ_LEN, generator=generator).argsort(dim=1)
    masked = torch.zeros(count, SEQ_LEN, dtype=torch.bool)
    masked.scatter_(1, order[:, :MASKED_PER_SEQUENCE], True)
    labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
    inputs = torch.where(masked, torch.zeros_like(tokens), tokens)  # token 0 plays [MASK]
    return {"input_ids": inputs, "labels": labels}


def slice_samples(samples: dict[str, torch.Tensor], start: int, count: int) -> dict[str, torch.Tensor]:
    """Samples `start` .. `start + count - 1` as a batch."""
    return {key: value[start : start + count] for key, value in samples.items()}
