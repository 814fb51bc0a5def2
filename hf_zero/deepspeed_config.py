"""Read a DeepSpeed config so users can migrate without rewriting it.

Only the parts that describe ZeRO, precision, loss scaling, clipping and accumulation carry
over; everything else (optimizer, scheduler, batch sizes, logging) is the training loop's
business and is reported in one warning. Values of "auto" keep hf_zero's default, which the
Trainer integration then fills from `TrainingArguments`, as DeepSpeed's Trainer integration does.
"""

from __future__ import annotations

import warnings
from typing import Any

# DeepSpeed key -> ZeroConfig field, per section.
_ZERO_KEYS = {
    "stage": "stage",
    "reduce_bucket_size": "reduce_bucket_size",
    "overlap_comm": "overlap_comm",
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


def zero_fields_from_deepspeed(ds: dict[str, Any]) -> dict[str, Any]:
    """Map a DeepSpeed config dict onto ZeroConfig field values; warn about what is not used."""
    if not isinstance(ds, dict):
        raise ValueError(f"a DeepSpeed config must be a mapping, got {type(ds).__name__}")
    out: dict[str, Any] = {}
    ignored: list[str] = []

    zero = ds.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):
        raise ValueError("DeepSpeed config: 'zero_optimization' must be a mapping")
    for key, value in zero.items():
        if key in _ZERO_KEYS:
            _set(out, _ZERO_KEYS[key], value)
        elif key in _OFFLOAD_SECTIONS:
            _read_offload(out, _OFFLOAD_SECTIONS[key], key, value, ignored)
        else:
            ignored.append(f"zero_optimization.{key}")

    out.update(_read_precision(ds, ignored))

    for key, value in ds.items():
        if key in _TOP_KEYS:
            _set(out, _TOP_KEYS[key], value)
        elif key not in ("zero_optimization", "fp16", "bf16", "bfloat16"):
            ignored.append(key)

    if ignored:
        warnings.warn(
            "hf_zero ignores these DeepSpeed config keys (the training loop or hf_zero's own defaults "
            "cover them): " + ", ".join(ignored),
            UserWarning,
            stacklevel=3,
        )
    return out


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
        else:
            ignored.append(f"zero_optimization.{section}.{key}")


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
        elif key != "enabled":
            ignored.append(f"fp16.{key}")
    ignored.extend(f"bf16.{key}" for key in bf16 if key != "enabled")
    return out
