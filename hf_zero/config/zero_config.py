"""`ZeroConfig`: the one typed, validated description of how hf_zero shards and trains.

Build it directly, from a dict, from a YAML/JSON file, or from a DeepSpeed config
(`ZeroConfig.from_deepspeed`). Every bad value raises a `ValueError` that names the field, the
value and what is allowed; an unknown key names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .deepspeed import check_loop_values, zero_fields_from_deepspeed

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REDUCE_DTYPES = ("auto", "fp32")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
GENERATE_GATHER = ("auto", "once", "per_unit")
OFFLOAD_OVERLAP = ("exact", "delayed")
QUANTIZATIONS = ("none", "int8")
# The default stage-3 prefetch budget holds at least this much: units smaller than half of it are
# bound by each collective's latency rather than its bandwidth, so several go in one all-gather
# (DeepSpeed's stage3_prefetch_bucket_size plays this part, 5e7 elements by default).
MIN_PREFETCH_BYTES = 64 * 2**20
_PRECISION_ALIASES = {
    "float32": "fp32",
    "no": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}


def did_you_mean(key: str, valid: list[str]) -> str:
    """`"; did you mean 'x'?"` naming the valid key closest to a mistyped one, or "" if none is close."""
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass
class ZeroConfig:
    """How the engine shards state, computes, reduces gradients and scales losses.

    Attributes:
        stage: ZeRO stage. 0 = no sharding (data parallel), 1 = optimizer state and fp32 master
            weights sharded, 2 = gradients sharded as well, 3 = parameters sharded as well.
        precision: compute precision of the model: "fp32", "bf16", "fp16", or "auto" (follow the
            Trainer's `bf16`/`fp16` arguments; fp32 in plain loops). With 16-bit precision the model
            computes in 16 bits and the optimizer updates fp32 master weights.
        offload_optimizer: where optimizer state and master weights live: "none", "cpu", "nvme".
        offload_params: where stage-3 parameter shards live: "none", "cpu", "nvme".
        nvme_path: folder for NVMe offload files (required when either offload is "nvme").
        offload_overlap: CPU optimizer offload: "exact" updates the weights within the step;
            "delayed" runs the host update of step t while the device computes step t+1, which
            therefore uses weights one update old (ZeRO-Offload's delayed parameter update).
        offload_chunk_size: CPU optimizer offload: elements per host staging buffer; each rank's
            gradient shard goes to the host, and its new weights back, through two of them.
        nvme_buffer_count: NVMe offload: host buffers the optimizer step cycles segments through
            (one being updated, the next being read, the previous being written); each holds the
            largest segment's master, optimizer state, gradient and 16-bit copy. At least 2.
        loss_scale: fp16 only. 0 = dynamic loss scaling; a positive value = that static scale.
        initial_scale_power: fp16 dynamic scaling starts at 2**initial_scale_power.
        loss_scale_window: overflow-free steps before the dynamic scale doubles.
        hysteresis: overflows tolerated before the dynamic scale is halved.
        min_loss_scale: the floor of the dynamic scale; training stops with an error below it.
        reduce_bucket_size: elements per gradient bucket. Buckets are also the unit in which the
            flat parameter buffers are sharded and all-gathered after the step.
        reduce_dtype: the dtype gradients are summed over ranks in: "auto" (the compute dtype) or
            "fp32", which sums 16-bit gradients in fp32 (twice the reduction's bytes and gradient
            buffers, one rounding less; DeepSpeed's `communication_data_type`).
        overlap_comm: stage 2: reduce-scatter each gradient bucket as soon as it is complete, while
            backward is still running. False reduces after each backward pass instead (staging up
            to a full 16-bit gradient meanwhile), which is always exact, also for models that
            reuse parameters a varying number of times per pass.
        gradient_clipping: clip the global gradient norm to this value (0 = no clipping).
        gradient_accumulation_steps: micro-batches per optimizer step, used by `ZeroTrainer` and
            `hf-zero train` (the engine itself steps whenever `step()` is called).
        allow_untested_optimizer: accept an optimizer class hf_zero does not know to be
            elementwise. Only elementwise optimizers give correct results on flat shards.
        whole_parameter_optimizers: names of optimizer classes (as `Lamb` or `my_pkg.Lamb`) whose
            update of a tensor needs the whole tensor: each parameter is then stepped whole, by the
            optimizer's own class, at one rank that owns it (torch's Adafactor is stepped so anyway;
            torch's Muon has a path of its own).
        quantized_weights: stage 3 (ZeRO++ qwZ): "int8" sends the forward all-gathers of the layer
            units as block-wise int8 with one fp32 scale per `quantization_block` elements, dequantized
            into the gathered 16-bit buffer (half the bytes; the forward computes on weights rounded to
            int8 per block). Backward gathers, and the root unit (gathered once for both passes), stay
            16-bit. "none": exact 16-bit gathers.
        quantized_gradients: stages 2-3 (ZeRO++ qgZ): "int8" reduces gradients as block-wise int8 in
            two all-to-alls, first inside each node, then across nodes (one rank per node), each
            dequantized and summed in fp32 (a quarter of a 16-bit reduce-scatter's cross-node bytes
            on two ranks per node, less with more). "none": exact reduce-scatters.
        quantization_block: elements per int8 block (one fp32 scale each): a power of two from 16 to
            4096. Smaller blocks follow the values more closely and send more scales.
        hpz_partition_size: stage 3 (ZeRO++ hpZ): ranks per group (a node) that keep a secondary copy
            of the 16-bit weights, partitioned among them (1/hpz_partition_size of the layer units per
            rank), filled by each forward gather; backward gathers then stay inside the group. 1 (the
            default) keeps no secondary copy. Must divide the world size.
        node_size: ranks per node, which the hierarchical reduction of `quantized_gradients` and the
            estimate's cross-node figures follow. None: the launcher's `LOCAL_WORLD_SIZE` (torchrun,
            accelerate), else every rank on one node. Must divide the world size; nodes are
            consecutive ranks.
        debug_collectives: after every step, check that all ranks issued the same sequence of
            collectives (one small all-gather per step); raises if they did not.
        unit_classes: names of the layer classes whose instances are units (laid out together
            and, at stage 3, gathered together); None takes the model's `_no_split_modules`, or its
            top-level children when it names none.
        prefetch_bytes: stage 3: how many bytes of units may be gathered ahead of the one running
            (their all-gathers overlap its compute, in forward and in backward), refilled once half
            of it is free, in one all-gather. None: one unit ahead whatever its size, and at least
            64 MiB (`MIN_PREFETCH_BYTES`), so small units travel several to a collective; 0 turns
            prefetching off.
        generate_gather: stage 3, `model.generate()`: "auto" gathers the whole model once per call
            when its 16-bit weights fit in half the free device memory, else unit by unit for every
            token; "once" and "per_unit" force either.
        collective_timeout: seconds a rank may wait in one of hf_zero's collectives before it
            reports what it waits in, what every rank last issued, and exits (a hang when ranks
            disagree: one calls `generate` or `save_model` and the others do not, a rank died);
            0 waits forever. Default 600, as NCCL's own timeout.
        async_checkpoints: `engine.save_checkpoint` (and so `ZeroTrainer`'s and the recipes'
            checkpoints) copies this rank's part into host buffers and returns; a background thread
            writes and finishes the checkpoint while training goes on. The host buffers hold
            what the rank writes (with AdamW 12 bytes per trained parameter it owns) from the
            first save on.
        deepspeed_loop_values: the concrete training-loop values of a DeepSpeed config
            (`{"optimizer.params.lr": 3e-4, ...}`; `from_deepspeed` fills it). hf_zero does not
            build the optimizer, so nothing applies them: `ZeroTrainer` refuses to train when its
            `TrainingArguments` disagree with one, as the Trainer's DeepSpeed integration does.
    """

    stage: int = 2
    precision: str = "auto"
    offload_optimizer: str = "none"
    offload_params: str = "none"
    nvme_path: str | None = None
    offload_overlap: str = "exact"
    offload_chunk_size: int = 2**25
    nvme_buffer_count: int = 3
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    reduce_bucket_size: int = 50_000_000
    reduce_dtype: str = "auto"
    overlap_comm: bool = True
    gradient_clipping: float = 0.0
    gradient_accumulation_steps: int = 1
    allow_untested_optimizer: bool = False
    whole_parameter_optimizers: list[str] = field(default_factory=list)
    quantized_weights: str = "none"
    quantized_gradients: str = "none"
    quantization_block: int = 256
    hpz_partition_size: int = 1
    node_size: int | None = None
    debug_collectives: bool = False
    unit_classes: list[str] | None = None
    prefetch_bytes: int | None = None
    generate_gather: str = "auto"
    collective_timeout: float = 600.0
    async_checkpoints: bool = False
    deepspeed_loop_values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stage = _check_int("stage", self.stage, minimum=0, maximum=3)
        precision = self.precision.lower() if isinstance(self.precision, str) else self.precision
        self.precision = _check_choice("precision", _PRECISION_ALIASES.get(precision, precision), PRECISIONS)
        self.offload_optimizer = _check_choice("offload_optimizer", self.offload_optimizer, OFFLOAD_DEVICES)
        self.offload_params = _check_choice("offload_params", self.offload_params, OFFLOAD_DEVICES)
        if self.nvme_path is not None and not isinstance(self.nvme_path, (str, os.PathLike)):
            raise ValueError(
                f"ZeroConfig.nvme_path={self.nvme_path!r} is not allowed: expected a folder path"
            )
        self.nvme_path = None if self.nvme_path is None else str(self.nvme_path)
        self.offload_overlap = _check_choice("offload_overlap", self.offload_overlap, OFFLOAD_OVERLAP)
        reduce_dtype = self.reduce_dtype.lower() if isinstance(self.reduce_dtype, str) else self.reduce_dtype
        self.reduce_dtype = _check_choice(
            "reduce_dtype", "fp32" if reduce_dtype == "float32" else reduce_dtype, REDUCE_DTYPES
        )
        self.offload_chunk_size = _check_int("offload_chunk_size", self.offload_chunk_size, minimum=1)
        self.nvme_buffer_count = _check_int("nvme_buffer_count", self.nvme_buffer_count, minimum=2)
        self.loss_scale = _check_float("loss_scale", self.loss_scale, minimum=0.0)
        self.initial_scale_power = _check_int("initial_scale_power", self.initial_scale_power, 0, 64)
        self.loss_scale_window = _check_int("loss_scale_window", self.loss_scale_window, minimum=1)
        self.hysteresis = _check_int("hysteresis", self.hysteresis, minimum=1)
        self.min_loss_scale = _check_float("min_loss_scale", self.min_loss_scale, minimum=0.0, strict=True)
        self.reduce_bucket_size = _check_int("reduce_bucket_size", self.reduce_bucket_size, minimum=1)
        self.overlap_comm = _check_bool("overlap_comm", self.overlap_comm)
        self.gradient_clipping = _check_float("gradient_clipping", self.gradient_clipping, minimum=0.0)
        self.gradient_accumulation_steps = _check_int(
            "gradient_accumulation_steps", self.gradient_accumulation_steps, minimum=1
        )
        self.allow_untested_optimizer = _check_bool("allow_untested_optimizer", self.allow_untested_optimizer)
        self.whole_parameter_optimizers = (
            _check_names(
                "whole_parameter_optimizers",
                self.whole_parameter_optimizers or None,
                "a list of optimizer class names",
            )
            or []
        )
        self.quantized_weights = _check_choice("quantized_weights", self.quantized_weights, QUANTIZATIONS)
        self.quantized_gradients = _check_choice(
            "quantized_gradients", self.quantized_gradients, QUANTIZATIONS
        )
        self.quantization_block = _check_int("quantization_block", self.quantization_block, 16, 4096)
        if self.quantization_block & (self.quantization_block - 1):
            raise ValueError(
                f"ZeroConfig.quantization_block={self.quantization_block} is not allowed: expected a power of "
                "two from 16 to 4096 (256 is a good default)"
            )
        self.hpz_partition_size = _check_int("hpz_partition_size", self.hpz_partition_size, minimum=1)
        if self.node_size is not None:
            self.node_size = _check_int("node_size", self.node_size, minimum=1)
        self.debug_collectives = _check_bool("debug_collectives", self.debug_collectives)
        self.unit_classes = _check_names("unit_classes", self.unit_classes)
        if self.prefetch_bytes is not None:
            self.prefetch_bytes = _check_int("prefetch_bytes", self.prefetch_bytes, minimum=0)
        self.generate_gather = _check_choice("generate_gather", self.generate_gather, GENERATE_GATHER)
        self.collective_timeout = _check_float("collective_timeout", self.collective_timeout, minimum=0.0)
        self.async_checkpoints = _check_bool("async_checkpoints", self.async_checkpoints)
        self.deepspeed_loop_values = check_loop_values(self.deepspeed_loop_values)
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.offload_params != "none" and self.stage != 3:
            raise ValueError(
                f"ZeroConfig.offload_params={self.offload_params!r} is not allowed with stage={self.stage}: "
                "parameters are only sharded (and so only offloadable) at stage 3; set stage=3 or "
                "offload_params='none'"
            )
        if self.offload_overlap == "delayed" and self.offload_optimizer != "cpu":
            raise ValueError(
                f"ZeroConfig.offload_overlap='delayed' is not allowed with offload_optimizer="
                f"{self.offload_optimizer!r}: the delayed update overlaps the host's optimizer step with the "
                "next step's compute; set offload_optimizer='cpu' or offload_overlap='exact'"
            )
        if self.offload_params != "none" and self.offload_optimizer == "none":
            raise ValueError(
                f"ZeroConfig.offload_params={self.offload_params!r} is not allowed with offload_optimizer='none': "
                "the fp32 masters and optimizer state (12-16 bytes per parameter) would stay on the GPU while "
                "the 16-bit shards (2 bytes) leave it; set offload_optimizer='cpu' (or 'nvme') as well"
            )
        if self.quantized_weights != "none" and self.stage != 3:
            raise ValueError(
                f"ZeroConfig.quantized_weights={self.quantized_weights!r} is not allowed with stage={self.stage}: "
                "only stage 3 gathers weights; set stage=3 or quantized_weights='none'"
            )
        if self.hpz_partition_size > 1 and self.stage != 3:
            raise ValueError(
                f"ZeroConfig.hpz_partition_size={self.hpz_partition_size} is not allowed with stage={self.stage}: "
                "the secondary partition serves stage 3's backward gathers; set stage=3 or hpz_partition_size=1"
            )
        if self.hpz_partition_size > 1 and self.offload_params != "none":
            raise ValueError(
                f"ZeroConfig.hpz_partition_size={self.hpz_partition_size} is not allowed with offload_params="
                f"{self.offload_params!r}: the secondary partition would keep on the GPU the weights offloading "
                "moves off it; set hpz_partition_size=1 or offload_params='none'"
            )
        if self.quantized_gradients != "none" and self.stage not in (2, 3):
            raise ValueError(
                f"ZeroConfig.quantized_gradients={self.quantized_gradients!r} is not allowed with stage="
                f"{self.stage}: gradients are reduced during backward at stages 2 and 3 only; set stage=2 or 3, "
                "or quantized_gradients='none'"
            )
        uses_nvme = "nvme" in (self.offload_optimizer, self.offload_params)
        if uses_nvme and not self.nvme_path:
            raise ValueError(
                "ZeroConfig.nvme_path=None is not allowed when offloading to 'nvme': set nvme_path to a "
                "folder on a fast local disk"
            )

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ZeroConfig:
        """Build a config from a flat mapping of field names to values."""
        if not isinstance(values, dict):
            raise ValueError(
                f"ZeroConfig.from_dict expects a mapping of field names, got {type(values).__name__}"
            )
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                hint = did_you_mean(str(key), sorted(known)) or f"; valid fields: {', '.join(sorted(known))}"
                raise ValueError(f"unknown ZeroConfig field {key!r}{hint}")
        return cls(**{key: _from_text(key, value) for key, value in values.items()})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ZeroConfig:
        """Read a config from a `.yaml`/`.yml` or `.json` file holding a flat mapping of fields."""
        values = load_mapping(path)
        if "zero_optimization" in values:
            raise ValueError(
                f"{path} looks like a DeepSpeed config (it has 'zero_optimization'); read it with "
                "ZeroConfig.from_deepspeed(path) instead"
            )
        return cls.from_dict(values)

    @classmethod
    def from_deepspeed(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> ZeroConfig:
        """Translate a DeepSpeed JSON config (path or dict). The parts hf_zero does not use are
        reported (one warning, a line per block, on one process); see `hf_zero.config.deepspeed`."""
        values = path_or_dict if isinstance(path_or_dict, dict) else load_mapping(path_or_dict)
        return cls.from_dict(zero_fields_from_deepspeed(values))

    @classmethod
    def coerce(cls, config: ZeroConfig | dict[str, Any] | str | os.PathLike | None) -> ZeroConfig:
        """Accept a config object, a dict, a file path, or None (the defaults)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if isinstance(config, (str, os.PathLike)):
            return cls.from_file(config)
        raise ValueError(
            f"zero_config={config!r} is not allowed: expected a ZeroConfig, a dict of its fields or a "
            "path to a YAML/JSON file"
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what `from_dict` reads back)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ZeroConfig:
        """A validated copy with some fields changed."""
        return ZeroConfig.from_dict({**self.to_dict(), **changes})


class YamlLoader(yaml.SafeLoader):
    """YAML as people write configs: only true/false are booleans (`save_strategy: no` stays the
    string "no", as in YAML 1.2), and `1e-3` is a float even without a decimal point."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """Parse YAML text with `YamlLoader`."""
    return yaml.load(text, Loader=YamlLoader)


def load_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """Load a YAML or JSON file whose top level is a mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            values = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            values = load_yaml(text)
        else:
            raise ValueError(f"config file {str(path)!r} must end in .yaml, .yml or .json")
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"config file {str(path)!r} is not valid {suffix[1:].upper()}: {error}") from error
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping at its top level")
    return values


# ---- validation helpers -----------------------------------------------------------------------

_NUMERIC_FIELDS = {f.name for f in fields(ZeroConfig) if f.type in ("int", "float")}


def _from_text(name: str, value: Any) -> Any:
    """YAML reads `5e7` as a string; accept numeric text for numeric fields."""
    if name in _NUMERIC_FIELDS and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    return value


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"ZeroConfig.{name}={value!r} is not allowed: expected {allowed}")


def _check_names(
    name: str, value: Any, expected: str = "a list of class names (or null for the model's own layer classes)"
) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise _fail(name, value, expected)
    return list(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "true or false")
    return value


def _check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    bounds = _bounds_text(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, value, f"an integer{bounds}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(name, value, f"an integer{bounds}")
    return value


def _check_float(name: str, value: Any, minimum: float, strict: bool = False) -> float:
    relation = ">" if strict else ">="
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, value, f"a number {relation} {minimum:g}")
    if value != value or value < minimum or (strict and value == minimum):
        raise _fail(name, value, f"a number {relation} {minimum:g}")
    return float(value)


def _bounds_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    return ""
