"""Read a DeepSpeed config so users can migrate without rewriting it.

Only the parts that describe ZeRO, precision, loss scaling, clipping and accumulation carry
over. The rest (optimizer, scheduler, batch sizes, logging) is the training loop's business: it is
reported, one line per block, on one process. Values of "auto" keep hf_zero's default, which the
Trainer integration then fills from `TrainingArguments`, as DeepSpeed's Trainer integration does.
A concrete training-loop value (`optimizer.params.lr`, the betas, eps, weight decay, the
scheduler's `warmup_max_lr`, the batch sizes) is kept in `ZeroConfig.deepspeed_loop_values`, and
`ZeroTrainer` refuses to train when `TrainingArguments` disagree with it, as the Trainer does with
`--deepspeed`: a learning rate in the config never gets dropped silently.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

# DeepSpeed key -> ZeroConfig field, per section.
_ZERO_KEYS = {
    "stage": "stage",
    "reduce_bucket_size": "reduce_bucket_size",
    "overlap_comm": "overlap_comm",
    "zero_hpz_partition_size": "hpz_partition_size",
}
# DeepSpeed's ZeRO++ switches (booleans) -> the ZeroConfig field that names the quantization.
_ZERO_QUANTIZE_KEYS = {
    "zero_quantized_weights": "quantized_weights",
    "zero_quantized_gradients": "quantized_gradients",
}
_FP16_KEYS = {
    "loss_scale": "loss_scale",
    "initial_scale_power": "initial_scale_power",
    "loss_scale_window": "loss_scale_window",
    "hysteresis": "hysteresis",
    "min_loss_scale": "min_loss_scale",
}
_TOP_KEYS = {
    "gradient_clipping": "gradient_clipping",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "zero_allow_untested_optimizer": "allow_untested_optimizer",
}
_OFFLOAD_SECTIONS = {"offload_optimizer": "offload_optimizer", "offload_param": "offload_params"}

# DeepSpeed training-loop key -> (what TrainingArguments call it, its value there), the pairs the
# Trainer's DeepSpeed integration checks (`HfTrainerDeepSpeedConfig.trainer_config_process`).
LOOP_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "optimizer.params.lr": ("learning_rate", lambda args: args.learning_rate),
    "optimizer.params.betas": ("adam_beta1, adam_beta2", lambda args: [args.adam_beta1, args.adam_beta2]),
    "optimizer.params.eps": ("adam_epsilon", lambda args: args.adam_epsilon),
    "optimizer.params.weight_decay": ("weight_decay", lambda args: args.weight_decay),
    "scheduler.params.warmup_max_lr": ("learning_rate", lambda args: args.learning_rate),
    "train_micro_batch_size_per_gpu": (
        "per_device_train_batch_size",
        lambda args: args.per_device_train_batch_size,
    ),
    "train_batch_size": (
        "per_device_train_batch_size x processes x gradient_accumulation_steps",
        lambda args: args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
    ),
}

# Why hf_zero does not use each block, for the report (one line per block; keys set to "auto"
# are left out: they ask for a default, and hf_zero's own defaults apply).
_WHY_NOT_USED = {
    "optimizer": "your optimizer trains; ZeroTrainer checks concrete values against TrainingArguments",
    "scheduler": "the training loop's (ZeroTrainer: lr_scheduler_type, warmup_steps)",
    "batch sizes": "the data loader's; ZeroTrainer checks them against TrainingArguments",
    "zero_optimization": "hf_zero's own settings apply",
    "fp16/bf16": "no hf_zero counterpart",
    "other": "no hf_zero counterpart",
}
_SHOWN_KEYS = 3  # names listed per line before "and N more"


def zero_fields_from_deepspeed(ds: dict[str, Any]) -> dict[str, Any]:
    """Map a DeepSpeed config dict onto ZeroConfig field values; report what is not used."""
    if not isinstance(ds, dict):
        raise ValueError(f"a DeepSpeed config must be a mapping, got {type(ds).__name__}")
    out: dict[str, Any] = {}
    ignored: dict[str, list[str]] = {block: [] for block in _WHY_NOT_USED}

    zero = ds.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):
        raise ValueError("DeepSpeed config: 'zero_optimization' must be a mapping")
    for key, value in zero.items():
        if key in _ZERO_KEYS:
            _set(out, _ZERO_KEYS[key], value)
        elif key in _ZERO_QUANTIZE_KEYS:
            if not isinstance(value, bool):
                raise ValueError(
                    f"DeepSpeed config: 'zero_optimization.{key}' must be true or false, got {value!r}"
                )
            out[_ZERO_QUANTIZE_KEYS[key]] = "int8" if value else "none"
        elif key in _OFFLOAD_SECTIONS:
            _read_offload(out, _OFFLOAD_SECTIONS[key], key, value, ignored["zero_optimization"])
        elif value != "auto":
            ignored["zero_optimization"].append(key)

    out.update(_read_precision(ds, ignored["fp16/bf16"]))

    for key, value in ds.items():
        if key in _TOP_KEYS:
            _set(out, _TOP_KEYS[key], value)
        elif key == "communication_data_type" and str(value).lower() in ("fp32", "float32"):
            out["reduce_dtype"] = "fp32"
        elif key in ("optimizer", "scheduler"):
            kind = value.get("type") if isinstance(value, dict) else None
            ignored[key] = [str(kind) if kind else key]
        elif key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
            if value != "auto":
                ignored["batch sizes"].append(key)
        elif key not in ("zero_optimization", "fp16", "bf16", "bfloat16") and value != "auto":
            ignored["other"].append(key)

    loop_values = _loop_values(ds)
    if loop_values:
        out["deepspeed_loop_values"] = loop_values
    lines = [_report_line(block, names) for block, names in ignored.items() if names]
    if lines and _is_reporting_process():
        warnings.warn(
            "hf_zero does not use these parts of the DeepSpeed config:\n" + "\n".join(lines),
            UserWarning,
            stacklevel=3,
        )
    return out


def training_args_mismatches(loop_values: dict[str, Any], args: Any) -> list[str]:
    """`ds KEY=VALUE vs hf NAME=VALUE` for each value of `ZeroConfig.deepspeed_loop_values` that
    the `TrainingArguments` `args` disagree with."""
    mismatches = []
    for key, value in loop_values.items():
        name, of_args = LOOP_KEYS[key]
        expected = of_args(args)
        if value != expected:
            mismatches.append(f"- ds {key}={value} vs hf {name}={expected}")
    return mismatches


def check_loop_values(values: Any) -> dict[str, Any]:
    """`ZeroConfig.deepspeed_loop_values`, checked: a mapping of `LOOP_KEYS` to numbers (a pair of
    them for the betas)."""
    if not isinstance(values, dict):
        raise ValueError(
            f"ZeroConfig.deepspeed_loop_values={values!r} is not allowed: expected a mapping of DeepSpeed "
            "keys to numbers (ZeroConfig.from_deepspeed fills it)"
        )
    for key, value in values.items():
        if key not in LOOP_KEYS:
            raise ValueError(
                f"ZeroConfig.deepspeed_loop_values has {key!r}, which is not one of {sorted(LOOP_KEYS)}"
            )
        _check_number(key, value)
    return dict(values)


def _loop_values(ds: dict[str, Any]) -> dict[str, Any]:
    """The concrete (not "auto") training-loop values of `LOOP_KEYS` the config sets."""
    values = {}
    for key in LOOP_KEYS:
        node: Any = ds
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node != "auto":
            values[key] = _check_number(key, node)
    return values


def _check_number(key: str, value: Any) -> Any:
    pair = key.endswith("betas")
    if pair:
        good = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
    else:
        good = _is_number(value)
    if not good:
        wanted = "a pair of numbers" if pair else "a number"
        raise ValueError(f'DeepSpeed config: {key}={value!r} is not allowed: expected {wanted} or "auto"')
    return list(value) if pair else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _report_line(block: str, names: list[str]) -> str:
    """`  zero_optimization (a, b, c, d and 2 more): why` -- one block and the keys of it not used."""
    shown = ", ".join(names[:_SHOWN_KEYS])
    if len(names) > _SHOWN_KEYS:
        shown += f" and {len(names) - _SHOWN_KEYS} more"
    if block in ("batch sizes", "fp16/bf16", "other"):
        label = shown
    else:
        label = block if names == [block] else f"{block} ({shown})"
    return f"  {label}: {_WHY_NOT_USED[block]}"


def _is_reporting_process() -> bool:
    """Rank 0 of the process group, or before one exists, the process torchrun started as rank 0
    (or one started without a launcher): the report is the same on every rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _set(out: dict[str, Any], field: str, value: Any) -> None:
    if value != "auto":
        out[field] = value


def _read_offload(out: dict[str, Any], field: str, section: str, value: Any, ignored: list[str]) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"DeepSpeed config: 'zero_optimization.{section}' must be a mapping")
    for key, item in value.items():
        if key == "device":
            _set(out, field, item)
        elif key == "nvme_path":
            _set(out, "nvme_path", item)
        elif key == "buffer_count" and section == "offload_optimizer":
            _set(out, "nvme_buffer_count", item)
        elif item != "auto":
            ignored.append(f"{section}.{key}")


def _read_precision(ds: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
    fp16 = ds.get("fp16", {}) or {}
    bf16 = ds.get("bf16", ds.get("bfloat16", {})) or {}
    for name, section in (("fp16", fp16), ("bf16", bf16)):
        if not isinstance(section, dict):
            raise ValueError(f"DeepSpeed config: '{name}' must be a mapping")
    fp16_on, bf16_on = fp16.get("enabled", False), bf16.get("enabled", False)
    if fp16_on is True and bf16_on is True:
        raise ValueError("DeepSpeed config: 'fp16.enabled' and 'bf16.enabled' are both true; enable one")

    out: dict[str, Any] = {}
    if fp16_on is True:
        out["precision"] = "fp16"
    elif bf16_on is True:
        out["precision"] = "bf16"
    elif fp16_on is False and bf16_on is False and ("fp16" in ds or "bf16" in ds or "bfloat16" in ds):
        out["precision"] = "fp32"
    # Anything else ("auto", or no precision section at all) follows the Trainer's arguments.

    for key, value in fp16.items():
        if key in _FP16_KEYS:
            _set(out, _FP16_KEYS[key], value)
        elif key != "enabled" and value != "auto":
            ignored.append(f"fp16.{key}")
    ignored.extend(f"bf16.{key}" for key, value in bf16.items() if key != "enabled" and value != "auto")
    return out
