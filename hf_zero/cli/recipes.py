"""Recipes: one YAML file that says which model to build or load, on what data, with which Trainer
arguments and which `ZeroConfig`, run through `ZeroTrainer`.

A recipe has four sections:

    model:    {task: causal-lm | masked-lm | sft,
               architecture: gpt2, config: {...},        # a model built from a config, or
               pretrained: <Hub id or folder>,           # one loaded with hf_zero.from_pretrained
               tokenizer: train | <Hub id or folder>,    # default: trained on the data (config
               tokenizer_vocab_size: 2000,               #   models) or the pretrained one's
               kernels: liger, kernel_config: {...}}     # optional: Liger-Kernel's Triton kernels
    data:     {source: generated | files | hub | markov, sequence_length: ..., ...}
              # see hf_zero.cli.recipe_data for each source's fields
    training: {...}   # transformers.TrainingArguments fields; `optim: muon` (with Muon's settings
                      #   in `optim_args: "lr=0.02,momentum=0.95"`) trains the hidden matrices with
                      #   torch.optim.Muon and the rest with AdamW (learning_rate, adam_*, weight_decay)
    zero:     {...}   # hf_zero.ZeroConfig fields

`key=value` overrides address any leaf by its dotted path (`training.max_steps=50`,
`zero.stage=1`); values are read as YAML, so `50` is an int, `true` a bool and `no` the string "no".
Everything is checked by `Recipe.load`, before any process starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config.zero_config import ZeroConfig, did_you_mean, load_mapping, load_yaml
from ..hub.model_card import TRAINER_BOOKKEEPING
from ..offload.nvme import existing_folder
from .recipe_data import (
    ACCURACY_METRIC,
    TASKS,
    data_fields,
    describe_source,
    logits_for_metrics,
    metrics_for,
    prepare_data,
    tokenizer_spec,
    validate_data,
)
from .recipe_optimizer import muon_settings

SECTIONS = ("model", "data", "training", "zero")
KERNELS = ("none", "liger")
_MODEL_FIELDS = (
    "task", "architecture", "pretrained", "config", "tokenizer", "tokenizer_vocab_size", "kernels", "kernel_config",
)  # fmt: skip
# The Auto class of each task, and transformers' table of the model types it has a head for.
AUTO_CLASSES = {
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "sft": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "masked-lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
}


@dataclass
class Recipe:
    """A parsed recipe; see the module docstring for its sections. `path` and `overrides` say where
    it came from (for the model card and the run's command line)."""

    model: dict[str, Any]
    data: dict[str, Any]
    training: dict[str, Any]
    zero: dict[str, Any]
    path: str = ""
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        """Read a recipe file, apply `key=value` overrides and check the result."""
        values = load_mapping(path)
        for override in overrides:
            _apply_override(values, override)
        unknown = [key for key in values if key not in SECTIONS]
        if unknown:
            raise ValueError(
                f"recipe {path}: unknown section(s) {unknown}{did_you_mean(str(unknown[0]), list(SECTIONS))}; "
                f"sections are {list(SECTIONS)}"
            )
        for section in SECTIONS:
            if not isinstance(values.get(section, {}), dict):
                raise ValueError(f"recipe {path}: section {section!r} must be a mapping")
        sections = {section: dict(values.get(section) or {}) for section in SECTIONS}
        recipe = cls(**sections, path=str(path), overrides=tuple(overrides))
        recipe.validate(str(path))
        return recipe

    @property
    def task(self) -> str:
        return self.model.get("task", "causal-lm")

    def validate(self, where: str) -> None:
        """Check everything that can be checked before a process starts or a weight is read."""
        unknown = [key for key in self.model if key not in _MODEL_FIELDS]
        if unknown:
            raise ValueError(
                f"recipe {where}: unknown model field(s) {unknown}{did_you_mean(unknown[0], list(_MODEL_FIELDS))}; "
                f"fields are {list(_MODEL_FIELDS)}"
            )
        if "architecture" not in self.model and "pretrained" not in self.model:
            raise ValueError(
                f"recipe {where}: model.architecture (an AutoConfig model type such as gpt2, to build from a "
                "config) or model.pretrained (a Hub id or a local folder) is required"
            )
        if self.task not in TASKS:
            raise ValueError(
                f"recipe {where}: model.task={self.task!r} is not allowed: expected one of {list(TASKS)}"
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
        validate_data(self.data, self.task, where)
        if "output_dir" not in self.training:
            raise ValueError(f"recipe {where}: training.output_dir is required")
        _check_training_fields(self.training, where)
        muon_settings(self.training, where)
        config = _check_model_config(self.model, where)
        _check_task(config.model_type, self.task, where)
        spec = tokenizer_spec(self.model)
        if spec != "train" and "pretrained" not in self.model and not _loadable(spec):
            raise ValueError(
                f"recipe {where}: model.tokenizer={spec!r} is neither 'train' nor a folder or Hub id"
            )
        try:
            zero = ZeroConfig.from_dict(self.zero)
        except ValueError as error:
            raise ValueError(f"recipe {where}: zero section: {error}") from error
        if "nvme" in (zero.offload_optimizer, zero.offload_params):
            existing_folder(zero.nvme_path)

    def to_yaml(self) -> str:
        """The recipe as run (overrides applied), as YAML."""
        sections = {section: getattr(self, section) for section in SECTIONS}
        return yaml.safe_dump(sections, sort_keys=False)

    def command(self, processes: int) -> str:
        """The `hf-zero train` command line that runs this recipe."""
        return " ".join(["hf-zero train", self.path, "--nproc", str(processes), *self.overrides])


def _check_training_fields(training: dict[str, Any], where: str) -> None:
    """Every `training` key must be a `TrainingArguments` field (a typo would be an error only
    once every process has started, or never)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    valid = sorted(f.name for f in fields(TrainingArguments) if f.init)
    for key in training:
        if key not in valid:
            raise ValueError(
                f"recipe {where}: training.{key} is not a transformers.TrainingArguments field{did_you_mean(key, valid)}"
            )


def _loadable(spec: str) -> bool:
    """A local folder, or something shaped like a Hub id (`org/name` or `name`)."""
    return os.path.isdir(spec) or (
        not os.path.isabs(spec) and spec.count("/") <= 1 and not spec.startswith(".")
    )


def _check_model_config(model: dict[str, Any], where: str):
    """The model's config, checked: `model.architecture` must be a model type transformers knows, a
    `model.pretrained` folder must hold a config.json, and every `model.config` key must be a
    field of that config (`AutoConfig` would keep an unknown key as a stray attribute and build the
    default-sized model, silently)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    overrides = model.get("config") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"recipe {where}: model.config must be a mapping of config fields")
    if "pretrained" in model:
        source = str(model["pretrained"])
        if source.startswith((".", "/", "~")) and not os.path.isfile(
            os.path.join(os.path.expanduser(source), "config.json")
        ):
            raise FileNotFoundError(
                f"recipe {where}: model.pretrained={source!r} is not a folder with a config.json"
            )
        try:
            config = AutoConfig.from_pretrained(os.path.expanduser(source))
        except OSError as error:
            raise ValueError(
                f"recipe {where}: model.pretrained={source!r} could not be read as a local folder or a Hub model "
                f"(in the cache or online): {str(error).splitlines()[0]}"
            ) from error
        name = source
    else:
        architecture = model["architecture"]
        if architecture not in CONFIG_MAPPING:
            raise ValueError(
                f"recipe {where}: model.architecture={architecture!r} is not a model type transformers knows"
                f"{did_you_mean(str(architecture), list(CONFIG_MAPPING.keys()))}"
            )
        config = AutoConfig.for_model(architecture)
        name = architecture
    if "pretrained" in model:
        return config  # its model.config (for building) is not used
    valid = sorted(set(config.to_dict()) | set(getattr(config, "attribute_map", {})))
    for key in overrides:
        if key not in valid:
            raise ValueError(
                f"recipe {where}: model.config.{key} is not a field of the {name} config{did_you_mean(key, valid)}"
            )
    return config


def _check_task(model_type: str, task: str, where: str) -> None:
    """The model type must have the head the task trains (no masked-LM head on GPT-2, no causal one
    on BERT-only types)."""
    from transformers.models.auto import modeling_auto

    heads = getattr(modeling_auto, AUTO_CLASSES[task][1])
    if model_type not in heads:
        suited = [
            name for name, (_, table) in AUTO_CLASSES.items() if model_type in getattr(modeling_auto, table)
        ]
        hint = f"; it suits model.task={suited[0]}" if suited else ""
        raise ValueError(
            f"recipe {where}: model.task={task} needs a {AUTO_CLASSES[task][0]} head, and {model_type} models "
            f"have none{hint}"
        )


def _apply_override(values: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ValueError(
            f"override {override!r} must look like section.key=value, e.g. training.max_steps=50"
        )
    path = key.split(".")
    if path[0] not in SECTIONS:
        hint = did_you_mean(path[0], list(SECTIONS)) or f"; sections are {list(SECTIONS)}"
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


def model_config(model_section: dict[str, Any], tokenizer=None):
    """The model's config: the checkpoint's own with `model.pretrained` (`model.architecture` and
    `model.config` describe a model to build, so a recipe written for one can be pointed at a
    checkpoint with a single override), else built for `model.architecture` with the
    `model.config` overrides, taking its vocabulary size and special-token ids from the tokenizer
    trained for it. Without a tokenizer (token-id data), an architecture's default special-token id
    that the vocabulary set in `model.config` does not reach (GPT-2's 50256 in 256 tokens) is unset:
    no such token exists, and transformers would warn about it in every process."""
    from transformers import AutoConfig

    overrides = dict(model_section.get("config") or {})
    if "pretrained" in model_section:
        return AutoConfig.from_pretrained(os.path.expanduser(str(model_section["pretrained"])))
    if tokenizer is not None:
        overrides.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                overrides.setdefault(name, getattr(tokenizer, name))
    if "vocab_size" in overrides:
        defaults = AutoConfig.for_model(model_section["architecture"]).to_dict()
        for name, value in defaults.items():
            outside = isinstance(value, int) and not 0 <= value < int(overrides["vocab_size"])
            if name.endswith("_token_id") and outside:
                overrides.setdefault(name, None)
    return AutoConfig.for_model(model_section["architecture"], **overrides)


def model_type_of(recipe: Recipe) -> str:
    """The recipe's model type (`gpt2`, `llama`, ...), without building its config."""
    if "pretrained" in recipe.model:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(os.path.expanduser(str(recipe.model["pretrained"]))).model_type
    return str(recipe.model["architecture"])


def build_model(recipe: Recipe, tokenizer=None, seed: int | None = None):
    """The recipe's model: randomly initialised from its config, or loaded with
    `hf_zero.from_pretrained` (at stage 3 each rank reads only its shard). With `seed` (the
    recipe's `training.seed`), the random initialisation is that seed's, so a run repeats; the
    Trainer seeds only once the model exists."""
    import transformers

    if seed is not None:
        transformers.set_seed(seed)

    from ..hub.loading import from_pretrained

    auto_class = getattr(transformers, AUTO_CLASSES[recipe.task][0])
    if "pretrained" in recipe.model:
        model = from_pretrained(
            auto_class,
            os.path.expanduser(str(recipe.model["pretrained"])),
            recipe.zero,
        )
        vocab = model.config.get_text_config().vocab_size
        if tokenizer is not None and len(tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens and {recipe.model['pretrained']} embeds only {vocab}; "
                "use the model's own tokenizer (leave model.tokenizer out)"
            )
    else:
        model = auto_class.from_config(model_config(recipe.model, tokenizer))
    if recipe.task != "masked-lm" and getattr(model, "loss_type", "") is None:
        # Class names outside transformers' loss table (GPT2LMHeadModel) get the causal-LM loss
        # anyway, after a warning in every process; naming it gives the same loss, silently.
        model.loss_type = "ForCausalLM"
    return model


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


def _tensorboard_available() -> bool:
    from transformers.integrations import is_tensorboard_available

    return is_tensorboard_available()


def training_arguments(recipe: Recipe, model_type: str) -> dict[str, Any]:
    """The recipe's `TrainingArguments` fields, completed for this machine and its kernels:
    precision as the Trainer would pick it, CPU use without GPUs, TensorBoard logs when it is
    installed (into `<output_dir>/runs/`), progress bars only on a terminal (`disable_tqdm`
    otherwise, so that a log file or pipe gets plain lines)."""
    from .run_report import interactive_output

    training = dict(recipe.training)
    if muon_settings(training) is not None:  # not one of the Trainer's own `optim` names: ours
        del training["optim"]
        training.pop("optim_args", None)
    training.setdefault("disable_tqdm", not interactive_output())
    if torch.cuda.is_available():
        # Precision "auto" follows the Trainer: use bf16 where the GPU has it, unless the recipe says.
        if "bf16" not in training and "fp16" not in training:
            training["bf16"] = torch.cuda.is_bf16_supported()
    else:
        training.setdefault("use_cpu", True)
    training.setdefault("report_to", ["tensorboard"] if _tensorboard_available() else [])
    if recipe.task == "masked-lm":
        # Masked-LM heads (BERT's) average their loss themselves and ignore the token count the
        # Trainer hands over, so the Trainer's rescaling by the number of processes (meant for a
        # summed loss) would report and train on W times the loss.
        training.setdefault("average_tokens_across_devices", False)
    if recipe.model.get("kernels", "none") == "liger":
        check_liger(model_type)
        # The Trainer patches the model with Liger as training starts, before hf_zero shards it.
        training["use_liger_kernel"] = True
        training["liger_kernel_config"] = dict(recipe.model.get("kernel_config") or {})
    return training


def check_shared_folder(folder: str) -> None:
    """On several machines, check that every rank sees the same output folder, before anything is
    written there: rank 0 writes the generated data and the tokenizer that the others read, and
    renames the checkpoints every rank writes into. Each rank leaves a marker in `folder`, and every
    rank must see all of them; otherwise every rank raises, naming the fix. A collective (it is
    skipped on one machine, where the folder is one)."""
    import shutil
    import socket
    import uuid

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) >= world:
        return
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    markers = Path(folder) / f".hf_zero-shared-{token[0]}"
    markers.mkdir(parents=True, exist_ok=True)
    (markers / f"rank-{rank}").write_text(socket.gethostname())
    dist.barrier()
    seen = {int(path.name.removeprefix("rank-")) for path in markers.glob("rank-*")}
    views = [None] * world
    dist.all_gather_object(views, (socket.gethostname(), sorted(seen)))
    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(markers, ignore_errors=True)
    blind = [(r, host, ranks) for r, (host, ranks) in enumerate(views) if len(ranks) < world]
    if blind:
        r, host, ranks = blind[0]
        raise RuntimeError(
            f"training.output_dir {folder} is not one folder for all {world} processes: rank {r} (on {host}) "
            f"sees the markers of rank(s) {ranks} only. On several machines the output folder (checkpoints, "
            "the generated data, the tokenizer) must be on storage every machine mounts (NFS, Lustre, a "
            "shared volume), under the same path on each"
        )


def check_run(recipe: Recipe) -> None:
    """The checks that need the model's config and this machine, made before any process starts:
    the `model.config` overrides build a model (on the meta device, so no memory), and the training
    arguments complete (Liger-Kernel's availability). Errors are ValueError, ImportError or
    RuntimeError naming the problem."""
    config = model_config(recipe.model)
    _parameter_count(config, recipe.task)
    training_arguments(recipe, config.model_type)


def describe_run(recipe: Recipe, config, args) -> str:
    """One line saying what a run does: the model and its size, the data, ZeRO stage, precision,
    the global batch with its factors, where the model goes. `config` is the config of the model
    that trains (with the trained tokenizer's vocabulary), `args` the run's `TrainingArguments`."""
    zero = ZeroConfig.from_dict(recipe.zero)
    precision = zero.precision
    if precision == "auto":
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    offload = "" if zero.offload_optimizer == "none" else f", optimizer offload to {zero.offload_optimizer}"
    if recipe.training.get("optim") == "muon":
        offload += ", Muon for the hidden matrices and AdamW for the rest"
    name = recipe.model.get("pretrained") or recipe.model["architecture"]
    if "pretrained" in recipe.model and recipe.model.get("config"):
        name += " (its own config: model.config is for building a model)"
    per_process, steps = args.per_device_train_batch_size, args.gradient_accumulation_steps
    batch = (
        f"global batch {per_process * args.world_size * steps} = {per_process} per process x "
        f"{_counted(args.world_size, 'process', 'processes')} x {_counted(steps, 'accumulation step')}"
    )
    return (
        f"{name} ({_parameter_count(config, recipe.task):,} parameters, {recipe.task}) on "
        f"{describe_source(data_fields(recipe.data))}; ZeRO stage {zero.stage}{offload}, {precision}; "
        f"{batch}; output to {args.output_dir}"
    )


def _parameter_count(config, task: str) -> int:
    """The parameters of the model `config` describes, counted once each (tied ones too) on a
    build on the meta device: right at stage 3 too, where a rank's loaded model holds a shard."""
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, AUTO_CLASSES[task][0]).from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def _counted(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


@dataclass
class RecipeResult:
    """What a finished recipe run reports: the final evaluation (once), the training summary, and
    what it wrote where."""

    eval_metrics: dict[str, float]
    train_metrics: dict[str, float]
    output_dir: str
    written: list[str]
    eval_step: int | None = None
    runtime_s: float = 0.0  # the training loop's, as the card states it


def run_recipe(recipe: Recipe) -> RecipeResult:
    """Train the recipe with ZeroTrainer and write into `training.output_dir`: the model (a
    `from_pretrained` folder), its tokenizer, the loss and metric curves (`curves.png`) and a
    model card (`README.md`). Every rank calls it (under torchrun); rank 0 writes the files."""
    from transformers import TrainingArguments

    from ..hub.model_card import facts_from_trainer, write_card
    from ..integrations.resume import AUTO, newest_complete_checkpoint, restarted
    from ..integrations.trainer import ZeroTrainer
    from .run_report import install_step_logging, plot_curves

    args = TrainingArguments(**training_arguments(recipe, model_type_of(recipe)))
    main = args.process_index == 0
    check_shared_folder(args.output_dir)
    resume = args.resume_from_checkpoint
    if resume == AUTO or restarted():
        # A restarted worker (hf-zero train --max-restarts) continues from where the run got to.
        resume = newest_complete_checkpoint(args.output_dir) or (None if resume == AUTO else resume)
    with args.main_process_first(local=False, desc="data and tokenizer"):
        resuming_from = resume if isinstance(resume, str) else None
        data = prepare_data(
            recipe.model, recipe.data, args.output_dir, main, not args.disable_tqdm, resuming_from
        )
    model = build_model(recipe, data.tokenizer, args.seed)
    if main:  # said once the model exists: its size counts the vocabulary the tokenizer reached
        print(f"hf-zero train: {describe_run(recipe, model.config, args)}", flush=True)
    evaluating = data.evaluation is not None
    muon = muon_settings(recipe.training)
    trainer = ZeroTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.evaluation,
        data_collator=data.collator,
        processing_class=data.tokenizer,
        compute_metrics=metrics_for(recipe.task) if evaluating else None,
        preprocess_logits_for_metrics=logits_for_metrics(recipe.task) if evaluating else None,
        zero_config=recipe.zero,
        optimizer_cls_and_kwargs=(torch.optim.Muon, muon) if muon is not None else None,
    )
    logging = install_step_logging(trainer)
    # As in the Trainer's example scripts: a checkpoint folder, or true for the output folder's last
    # (hf_zero's "auto": its newest complete one, or none).
    result = trainer.train(resume_from_checkpoint=resume)
    eval_metrics, eval_step = {}, None
    if evaluating:
        last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
        if last is not None and last["step"] == trainer.state.global_step:
            eval_metrics = dict(last)  # the run just evaluated its final weights: no second pass
        else:
            logging.quiet = True  # printed once, by the caller, not also as a log line
            eval_metrics = trainer.evaluate()
        eval_step = trainer.state.global_step
    trainer.save_model(args.output_dir)
    written = ["model"] + (["tokenizer"] if data.tokenizer is not None else [])
    # One measurement of the training time, for the card and the console: the Trainer's own.
    runtime = float(result.metrics.get("train_runtime", 0.0))
    if main:
        metric_names = (ACCURACY_METRIC[recipe.task], "perplexity") if evaluating else ()
        if plot_curves(trainer.state.log_history, Path(args.output_dir) / "curves.png", metric_names):
            written.append("curves (curves.png)")
        card = write_card(
            args.output_dir,
            {
                **facts_from_trainer(trainer, args.output_dir),
                "task": recipe.task,
                "base_model": recipe.model.get("pretrained"),
                "data": data.description,
                "tokenizer": _tokenizer_words(recipe, data.tokenizer),
                "runtime_s": runtime,
                "curve": "curves.png" if (Path(args.output_dir) / "curves.png").exists() else None,
                "recipe": recipe.to_yaml(),
                "command": recipe.command(args.world_size),
            },
        )
        if card is not None:
            written.append("model card (README.md)")
    return RecipeResult(
        _shown(eval_metrics), dict(result.metrics), args.output_dir, written, eval_step, runtime
    )


def _shown(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        key: value
        for key, value in metrics.items()
        if key not in TRAINER_BOOKKEEPING and isinstance(value, (int, float))
    }


def _tokenizer_words(recipe: Recipe, tokenizer) -> str | None:
    if tokenizer is None:
        return None
    spec = tokenizer_spec(recipe.model)
    if spec == "train":
        return (
            f"trained on the training data with `tokenizers` ({len(tokenizer)} tokens), saved with the model"
        )
    return f"`{spec}` ({len(tokenizer)} tokens)"
