"""Recipes: one YAML file that says which model to build, on what data, with which Trainer
arguments and which `ZeroConfig`, run through `ZeroTrainer`.

A recipe has four sections:

    model:    {architecture: gpt2, task: causal-lm, config: {...},   # built from a config, no download
               kernels: liger, kernel_config: {...}}   # optional: Liger-Kernel's Triton kernels
    data:     {source: markov, num_sequences: ..., sequence_length: ..., branching: ..., seed: ...,
               eval_sequences: ...}
    training: {...}   # transformers.TrainingArguments fields
    zero:     {...}   # hf_zero.ZeroConfig fields

`key=value` overrides address any leaf by its dotted path (`training.max_steps=50`,
`zero.stage=1`); values are read as YAML, so `50` is an int, `true` a bool and `no` the string "no".
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ZeroConfig, load_mapping, load_yaml
from .data import causal_lm_dataset, markov_corpus
from .nvme import existing_folder

SECTIONS = ("model", "data", "training", "zero")
TASKS = ("causal-lm",)
KERNELS = ("none", "liger")
DATA_SOURCES = ("markov",)
_DATA_DEFAULTS = {
    "source": "markov",
    "num_sequences": 2048,
    "sequence_length": 64,
    "branching": 4,
    "seed": 0,
    "eval_sequences": 128,
}


@dataclass
class Recipe:
    """A parsed recipe; see the module docstring for its sections."""

    model: dict[str, Any]
    data: dict[str, Any]
    training: dict[str, Any]
    zero: dict[str, Any]

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        """Read a recipe file and apply `key=value` overrides."""
        values = load_mapping(path)
        for override in overrides:
            _apply_override(values, override)
        unknown = [key for key in values if key not in SECTIONS]
        if unknown:
            raise ValueError(f"recipe {path}: unknown section(s) {unknown}; sections are {list(SECTIONS)}")
        for section in SECTIONS:
            if not isinstance(values.get(section, {}), dict):
                raise ValueError(f"recipe {path}: section {section!r} must be a mapping")
        recipe = cls(**{section: dict(values.get(section) or {}) for section in SECTIONS})
        recipe.validate(str(path))
        return recipe

    def validate(self, where: str) -> None:
        """Check what can be checked before anything heavy is imported or built."""
        if "architecture" not in self.model:
            raise ValueError(
                f"recipe {where}: model.architecture is required (an AutoConfig model type such as gpt2)"
            )
        task = self.model.get("task", "causal-lm")
        if task not in TASKS:
            raise ValueError(
                f"recipe {where}: model.task={task!r} is not allowed: expected one of {list(TASKS)}"
            )
        kernels = self.model.get("kernels", "none")
        if kernels not in KERNELS:
            raise ValueError(
                f"recipe {where}: model.kernels={kernels!r} is not allowed: expected one of {list(KERNELS)}"
            )
        if not isinstance(self.model.get("kernel_config") or {}, dict):
            raise ValueError(
                f"recipe {where}: model.kernel_config must be a mapping of Liger options (e.g. rope: false)"
            )
        unknown = [key for key in self.data if key not in _DATA_DEFAULTS]
        if unknown:
            raise ValueError(
                f"recipe {where}: unknown data field(s) {unknown}; fields are {sorted(_DATA_DEFAULTS)}"
            )
        source = self.data.get("source", "markov")
        if source not in DATA_SOURCES:
            raise ValueError(
                f"recipe {where}: data.source={source!r} is not allowed: expected {list(DATA_SOURCES)}"
            )
        if "output_dir" not in self.training:
            raise ValueError(f"recipe {where}: training.output_dir is required")
        _check_training_fields(self.training, where)
        _check_model_config(self.model, where)
        zero = ZeroConfig.from_dict(self.zero)
        if "nvme" in (zero.offload_optimizer, zero.offload_params):
            existing_folder(zero.nvme_path)


def _closest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_training_fields(training: dict[str, Any], where: str) -> None:
    """Every `training` key must be a `TrainingArguments` field (a typo would be an error only
    once every process has started, or never)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    valid = sorted(f.name for f in fields(TrainingArguments) if f.init)
    for key in training:
        if key not in valid:
            raise ValueError(
                f"recipe {where}: training.{key} is not a transformers.TrainingArguments field{_closest(key, valid)}"
            )


def _check_model_config(model: dict[str, Any], where: str) -> None:
    """`model.architecture` must be a model type transformers knows, and every `model.config` key
    a field of its config: `AutoConfig.for_model` would keep an unknown key as a stray attribute
    and build the default-sized model, silently."""
    from transformers import CONFIG_MAPPING, AutoConfig

    architecture = model["architecture"]
    if architecture not in CONFIG_MAPPING:
        raise ValueError(
            f"recipe {where}: model.architecture={architecture!r} is not a model type transformers knows"
            f"{_closest(str(architecture), list(CONFIG_MAPPING.keys()))}"
        )
    config = model.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"recipe {where}: model.config must be a mapping of {architecture} config fields")
    defaults = AutoConfig.for_model(architecture)
    valid = sorted(set(defaults.to_dict()) | set(getattr(defaults, "attribute_map", {})))
    for key in config:
        if key not in valid:
            raise ValueError(
                f"recipe {where}: model.config.{key} is not a field of the {architecture} config"
                f"{_closest(key, valid)}"
            )


def _apply_override(values: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ValueError(
            f"override {override!r} must look like section.key=value, e.g. training.max_steps=50"
        )
    path = key.split(".")
    if path[0] not in SECTIONS:
        close = difflib.get_close_matches(path[0], SECTIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; sections are {list(SECTIONS)}"
        raise ValueError(f"override {override!r} names unknown section {path[0]!r}{hint}")
    if len(path) < 2:
        raise ValueError(
            f"override {override!r} must name a field inside {path[0]!r}, e.g. {path[0]}.<field>=..."
        )
    node = values
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part!r} is not a mapping in this recipe")
    node[path[-1]] = load_yaml(text)


def build_model(model_section: dict[str, Any]):
    """A randomly initialised Hub-architecture model from `model.architecture` and `model.config`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_section["architecture"], **(model_section.get("config") or {}))
    return AutoModelForCausalLM.from_config(config)


def build_datasets(data_section: dict[str, Any], vocab_size: int):
    """Train and eval datasets generated as `data` describes (same chain, disjoint samples)."""
    data = {**_DATA_DEFAULTS, **data_section}
    total = data["num_sequences"] + data["eval_sequences"]
    tokens = markov_corpus(total, data["sequence_length"], vocab_size, data["branching"], data["seed"])
    train = causal_lm_dataset(tokens[: data["num_sequences"]])
    evaluation = causal_lm_dataset(tokens[data["num_sequences"] :]) if data["eval_sequences"] else None
    return train, evaluation


def check_liger(model_type: str) -> None:
    """Refuse `kernels: liger` where Liger-Kernel cannot run or would silently do nothing."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as error:
        raise ImportError(
            "model.kernels=liger needs the liger-kernel package: pip install 'hf-zero[liger]'"
        ) from error
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        supported = ", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))
        raise ValueError(
            f"Liger-Kernel has no kernels for model type {model_type!r}, so model.kernels=liger would change "
            f"nothing; it supports: {supported}. Remove model.kernels or pick one of those architectures"
        )
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "model.kernels=liger runs Triton GPU kernels and there is no GPU; for a (slow) test on CPU set "
            "TRITON_INTERPRET=1 and switch off the kernels its interpreter cannot run: "
            "model.kernel_config.rms_norm=false model.kernel_config.swiglu=false"
        )


def training_arguments(recipe: Recipe, model_type: str) -> dict[str, Any]:
    """The recipe's `TrainingArguments` fields, completed for this machine and its kernels."""
    training = dict(recipe.training)
    if torch.cuda.is_available():
        # Precision "auto" follows the Trainer: use bf16 where the GPU has it, unless the recipe says.
        if "bf16" not in training and "fp16" not in training:
            training["bf16"] = torch.cuda.is_bf16_supported()
    else:
        training.setdefault("use_cpu", True)
    training.setdefault("report_to", [])
    if recipe.model.get("kernels", "none") == "liger":
        check_liger(model_type)
        # The Trainer patches the model with Liger as training starts, before hf_zero shards it.
        training["use_liger_kernel"] = True
        training["liger_kernel_config"] = dict(recipe.model.get("kernel_config") or {})
    return training


def describe_run(recipe: Recipe, processes: int) -> str:
    """One line saying what a run will do: model and size, data, processes, ZeRO stage, precision,
    where the model goes. The model is built on the meta device to count its parameters."""
    with torch.device("meta"):
        model = build_model(recipe.model)
    parameters = sum(p.numel() for p in model.parameters())
    args = training_arguments(recipe, model.config.model_type)
    zero = ZeroConfig.from_dict(recipe.zero)
    precision = zero.precision
    if precision == "auto":
        precision = "bf16" if args.get("bf16") else "fp16" if args.get("fp16") else "fp32"
    data = {**_DATA_DEFAULTS, **recipe.data}
    offload = "" if zero.offload_optimizer == "none" else f", optimizer offload to {zero.offload_optimizer}"
    return (
        f"{recipe.model['architecture']} ({parameters / 1e6:.1f}M parameters, {recipe.model.get('task', 'causal-lm')}) "
        f"on generated {data['source']} data ({data['num_sequences']} train / {data['eval_sequences']} eval "
        f"sequences of {data['sequence_length']} tokens); {processes} process(es), ZeRO stage {zero.stage}{offload}, "
        f"{precision}; output to {recipe.training['output_dir']}"
    )


def run_recipe(recipe: Recipe) -> dict[str, float]:
    """Train the recipe with ZeroTrainer, save the final model to `training.output_dir`, return metrics."""
    from transformers import TrainingArguments

    from .integrations.trainer import ZeroTrainer

    model = build_model(recipe.model)
    args = TrainingArguments(**training_arguments(recipe, model.config.model_type))
    train, evaluation = build_datasets(recipe.data, model.config.vocab_size)
    trainer = ZeroTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, zero_config=recipe.zero
    )
    result = trainer.train()
    metrics = dict(result.metrics)
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(str(Path(args.output_dir)))
    return metrics
