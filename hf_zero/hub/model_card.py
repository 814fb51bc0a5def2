"""Model cards: the `README.md` hf_zero writes beside the models it saves (`ZeroTrainer.save_model`,
`hf-zero train`, `hf-zero merge`), filled from what the run knows.

The template is `model_cards/model_card.md` (installed as `hf_zero.model_cards`). Each `$field`
becomes a section built from the facts at hand; a section with nothing known about it is left out
whole, heading included, so a card never shows an empty field. A `README.md` that hf_zero did not
write (one without the template's marker line) is never replaced.
"""

from __future__ import annotations

import json
import os
import string
from importlib import resources
from pathlib import Path
from typing import Any

from .saving import write_atomically

MARKER = "<!-- written by hf_zero"
PIPELINE_TAGS = {"causal-lm": "text-generation", "sft": "text-generation", "masked-lm": "fill-mask"}
TASK_WORDS = {
    "causal-lm": "causal language modelling",
    "masked-lm": "masked language modelling",
    "sft": "supervised fine-tuning on instruction/response pairs",
}
# The config fields that say how big a model is, under the names the families use.
_SHAPE_FIELDS = (
    ("layers", ("num_hidden_layers", "n_layer")),
    ("hidden size", ("hidden_size", "n_embd", "d_model")),
    ("attention heads", ("num_attention_heads", "n_head")),
    ("key/value heads", ("num_key_value_heads",)),
    ("vocabulary", ("vocab_size",)),
    ("context length", ("max_position_embeddings", "n_positions")),
    ("experts", ("num_local_experts", "num_experts")),
)
# What the Trainer logs beside the metrics, which says nothing about the model.
TRAINER_BOOKKEEPING = frozenset(
    {"total_flos", "epoch", "step", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
)
AUTO_CLASSES = {
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "sft": "AutoModelForCausalLM",
}


def template() -> str:
    """The card template's text."""
    return resources.files("hf_zero.model_cards").joinpath("model_card.md").read_text()


def render_card(facts: dict[str, Any]) -> str:
    """The card for `facts` (see `write_card`), every section filled or left out."""
    sections = {
        "front_matter": _front_matter(facts),
        "title": facts.get("title") or "hf_zero model",
        "summary": _summary(facts),
        "model": _model(facts),
        "data": _data(facts),
        "training": _training(facts),
        "results": _results(facts),
        "recipe": _recipe(facts),
        "usage": _usage(facts),
    }
    text = string.Template(template()).substitute(sections)
    return _drop_empty_sections(text)


def write_card(folder: str | os.PathLike, facts: dict[str, Any], replace: bool = False) -> Path | None:
    """Write the card into `folder/README.md` (atomically); returns its path, or None when the folder
    holds a README.md hf_zero did not write, which stays as it is (`replace=True`: a README.md the
    same save just wrote, such as PEFT's placeholder card, is replaced).

    `facts` may hold: title, model_type, model_class, config (a dict), parameters, task,
    base_model, data, tokenizer (where it came from), zero (ZeroConfig fields), precision,
    world_size, device, steps, epochs, batch_size, learning_rate, runtime_s, metrics, curve (an
    image file in the folder), recipe (the recipe as YAML), command, checkpoint, peft, weights_dtype.
    """
    path = Path(folder) / "README.md"
    if not replace and path.exists() and MARKER not in path.read_text(errors="replace"):
        return None
    text = render_card(facts)
    write_atomically(path, lambda partial: Path(partial).write_text(text))
    return path


def _drop_empty_sections(text: str) -> str:
    parts = text.split("\n## ")
    kept = [parts[0]] + [part for part in parts[1:] if part.partition("\n")[2].strip()]
    return "\n## ".join(kept).rstrip() + "\n"


def _front_matter(facts: dict[str, Any]) -> str:
    tags = ["hf_zero", facts.get("model_type"), facts.get("task")]
    lines = ["library_name: " + ("peft" if facts.get("peft") else "transformers")]
    lines.append("tags:\n" + "\n".join(f"- {tag}" for tag in tags if tag))
    if facts.get("task") in PIPELINE_TAGS:
        lines.append(f"pipeline_tag: {PIPELINE_TAGS[facts['task']]}")
    if facts.get("base_model"):
        lines.append(f"base_model: {facts['base_model']}")
    return "\n".join(lines)


def _summary(facts: dict[str, Any]) -> str:
    from ..version import __version__

    what = facts.get("model_type") or facts.get("model_class") or "model"
    size = f" with {_count(facts['parameters'])} parameters" if facts.get("parameters") else ""
    origin = f"fine-tuned from `{facts['base_model']}`" if facts.get("base_model") else "trained"
    task = f" for {TASK_WORDS[facts['task']]}" if facts.get("task") in TASK_WORDS else ""
    return f"A {what} model{size}, {origin}{task} with [hf_zero](https://pypi.org/project/hf-zero/) {__version__}."


def _model(facts: dict[str, Any]) -> str:
    lines = []
    if facts.get("model_class"):
        lines.append(f"- class: `{facts['model_class']}`")
    if facts.get("parameters"):
        lines.append(f"- parameters: {facts['parameters']:,}")
    config = facts.get("config") or {}
    for label, names in _SHAPE_FIELDS:
        value = next((config[name] for name in names if config.get(name) is not None), None)
        if value is not None:
            lines.append(f"- {label}: {value}")
    if facts.get("weights_dtype"):
        lines.append(f"- saved weights: {facts['weights_dtype']}")
    if facts.get("peft"):
        lines.append("- this folder holds a PEFT adapter (the trainable weights), not the base model")
    return "\n".join(lines)


def _data(facts: dict[str, Any]) -> str:
    lines = []
    if facts.get("data"):
        lines.append(f"- data: {facts['data']}")
    if facts.get("tokenizer"):
        lines.append(f"- tokenizer: {facts['tokenizer']}")
    return "\n".join(lines)


def _training(facts: dict[str, Any]) -> str:
    lines = []
    zero = facts.get("zero") or {}
    if zero:
        offload = [
            f"{what} to {zero[key]}"
            for what, key in (("optimizer state", "offload_optimizer"), ("parameters", "offload_params"))
            if zero.get(key, "none") != "none"
        ]
        lines.append(
            f"- ZeRO stage {zero.get('stage')}" + (f", offloading {' and '.join(offload)}" if offload else "")
        )
    for label, key in (
        ("precision", "precision"),
        ("processes", "world_size"),
        ("hardware", "device"),
        ("optimizer steps", "steps"),
        ("epochs", "epochs"),
        ("global batch size", "batch_size"),
        ("learning rate", "learning_rate"),
        ("checkpoint", "checkpoint"),
    ):
        if facts.get(key) not in (None, ""):
            value = facts[key]
            lines.append(f"- {label}: {round(value, 3) if isinstance(value, float) else value}")
    if facts.get("runtime_s"):
        lines.append(f"- training time: {facts['runtime_s']:.0f} s")
    if zero:
        from ..config.zero_config import ZeroConfig

        defaults = ZeroConfig().to_dict()
        chosen = {key: value for key, value in zero.items() if value != defaults.get(key) or key == "stage"}
        shown = json.dumps(chosen, indent=2, sort_keys=True)
        lines.append(
            f"\nhf_zero configuration (`ZeroConfig`, the fields not at their defaults):\n\n```json\n{shown}\n```"
        )
    return "\n".join(lines)


def _results(facts: dict[str, Any]) -> str:
    metrics = {
        key: value for key, value in (facts.get("metrics") or {}).items() if isinstance(value, (int, float))
    }
    lines = []
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in sorted(metrics.items())]
    if facts.get("curve"):
        lines.append(f"\n![training curves]({facts['curve']})")
    return "\n".join(lines)


def _recipe(facts: dict[str, Any]) -> str:
    lines = []
    if facts.get("command"):
        lines.append(f"```bash\n{facts['command']}\n```")
    if facts.get("recipe"):
        lines.append(f"```yaml\n{facts['recipe'].rstrip()}\n```")
    return "\n\n".join(lines)


def _usage(facts: dict[str, Any]) -> str:
    folder = facts.get("load_path") or facts.get("title") or "path/to/this/folder"
    if facts.get("peft"):
        body = f'from peft import AutoPeftModel\n\nmodel = AutoPeftModel.from_pretrained("{folder}")'
    else:
        auto = AUTO_CLASSES.get(facts.get("task"), "AutoModel")
        body = f'from transformers import {auto}\n\nmodel = {auto}.from_pretrained("{folder}")'
        if facts.get("has_tokenizer"):
            body = body.replace("import ", "import AutoTokenizer, ", 1)
            body += f'\ntokenizer = AutoTokenizer.from_pretrained("{folder}")'
    return f"```python\n{body}\n```"


def _count(value: int) -> str:
    return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value:,}"


def task_of(model) -> str | None:
    """The recipe task a model's head serves, read off its class name (None for other heads)."""
    return task_of_class(type(model).__name__)


def task_of_class(name: str) -> str | None:
    """The recipe task a model class's head serves (`BertForMaskedLM`: masked-lm), or None."""
    if name.endswith("ForMaskedLM"):
        return "masked-lm"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    return None


def last_metrics(log_history: list[dict[str, Any]], loss_key: str) -> dict[str, Any]:
    """The last value of each evaluation metric in a Trainer's log history, and of `loss_key`
    (`train_loss` at the end of training, `loss` in a checkpoint taken before it)."""
    metrics: dict[str, Any] = {}
    for entry in log_history:
        metrics.update(
            {key: value for key, value in entry.items() if key.startswith("eval_") or key == loss_key}
        )
    return {key: value for key, value in metrics.items() if key not in TRAINER_BOOKKEEPING}


def hardware(world_size: int) -> str:
    """The devices a run used, in words."""
    import torch

    if torch.cuda.is_available():
        return f"{world_size} × {torch.cuda.get_device_name()}"
    return f"{world_size} CPU process(es) (gloo)"


def facts_from_trainer(trainer, output_dir: str | os.PathLike) -> dict[str, Any]:
    """What a `ZeroTrainer` knows about the model it trained, for its card."""
    from ..core.params import is_peft_model

    engine = trainer.zero_engine
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    config = getattr(model, "config", None)
    args, state = trainer.args, trainer.state
    peft = is_peft_model(model)
    return {
        "title": Path(output_dir).absolute().name,
        "load_path": str(output_dir),
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "config": config.to_dict() if hasattr(config, "to_dict") else None,
        "parameters": sum(
            slot.numel for group in engine.groups + engine.frozen for slot in group.layout.slots
        ),
        "task": task_of(model.get_base_model() if peft else model),
        "peft": peft,
        "zero": engine.config.to_dict(),
        "precision": engine.config.precision,
        "world_size": args.world_size,
        "device": hardware(args.world_size),
        "steps": state.global_step or None,
        "epochs": round(state.epoch, 2) if state.epoch else None,
        "batch_size": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "metrics": last_metrics(state.log_history, "train_loss"),
        "weights_dtype": "fp32 (the optimizer's master weights)",
        "has_tokenizer": trainer.processing_class is not None,
    }
