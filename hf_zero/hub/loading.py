"""`hf_zero.from_pretrained`: a pretrained model of which each rank reads only its own shard.

At ZeRO stage 3 the model is built on the meta device, as transformers builds it, and every
parameter the folder holds stays there, described by where its bytes lie in the safetensors
files (`pending.py`); the engine (`hf_zero.initialize`, also under ZeroTrainer and
ZeroAccelerator) then reads on each rank just the elements that rank keeps. Everything else
follows transformers' own `from_pretrained`: the config (with the keyword arguments meant for
it), the dtype ("auto": the config's, else the file's; modules the model keeps in fp32 load in
fp32), file keys matched to the model's (`weight_map.py`), tied weights, persistent buffers read
in full (they are small), non-persistent buffers computed, and parameters the folder lacks
initialised by the model's own `_init_weights` (the engine then gives every rank the first
rank's values). Only the headers of the files are read here.

At stages 0-2 every rank keeps the whole model anyway, and the model class's own
`from_pretrained` loads it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init

from ..config.zero_config import ZeroConfig
from ..core.params import assign, keep_in_fp32_matcher
from .pending import PendingParameter, PendingWeights, read_pieces
from .weight_map import WeightMap, map_weights
from .weights import TensorEntry, read_headers

# `transformers.PreTrainedModel.from_pretrained` options that place, quantise, split or adapt the
# model: the engine does the placing and sharding at stage 3, so they are refused there.
_REFUSED = (
    "device_map", "max_memory", "offload_folder", "offload_buffers", "quantization_config", "gguf_file",
    "state_dict", "variant", "tp_plan", "tp_size", "distributed_config", "device_mesh", "adapter_kwargs",
    "adapter_name", "output_loading_info", "use_kernels", "kernel_config", "from_tf", "from_flax",
)  # fmt: skip
# Options that only steer downloads: the folder or cache is read locally, so they change nothing.
_DOWNLOAD_ONLY = ("local_files_only", "token", "force_download", "proxies", "weights_only", "disable_mmap")


def from_pretrained(
    model_class: Any,
    name_or_path: str | os.PathLike,
    zero_config: ZeroConfig | dict | str | None,
    **hf_kwargs: Any,
) -> PreTrainedModel:
    """Load a pretrained model for training with hf_zero, reading at stage 3 only each rank's shard.

    Args:
        model_class: an Auto class (`AutoModelForCausalLM`, `AutoModel`, ...) or a model class.
        name_or_path: a folder written by `save_pretrained` (one `model.safetensors`, or an index
            and its shards), or a Hub model id already in the local Hugging Face cache (nothing is
            downloaded at stage 3).
        zero_config: the `ZeroConfig` (or dict, or YAML/JSON path) the model will be trained with.
        **hf_kwargs: as for transformers' `from_pretrained`: `dtype` (or `torch_dtype`), `config`,
            config overrides, model `__init__` arguments, `attn_implementation`, `revision`,
            `cache_dir`, `subfolder`, `ignore_mismatched_sizes`, `key_mapping`,
            `trust_remote_code`.

    Returns:
        At stage 3, a model whose loaded parameters are still on disk (on the meta device): hand
        it as it is to `hf_zero.initialize`, `ZeroTrainer` or `ZeroAccelerator.prepare`, which read
        each rank's shard; using, moving or casting it before then raises an error. At stages 0-2,
        `model_class.from_pretrained(name_or_path, **hf_kwargs)`.

    Raises:
        FileNotFoundError: the folder, its weights or a shard its index names is missing.
        ValueError: a file tensor's shape differs from the model's (unless
            `ignore_mismatched_sizes`), or the folder, saved from this same model class, holds a
            tensor the model has no place for. Tensors of another architecture's head (a
            pretraining checkpoint loaded with a task head) are skipped with a warning, as
            transformers skips them.
    """
    config = ZeroConfig.coerce(zero_config)
    if config.stage < 3:
        return model_class.from_pretrained(name_or_path, **hf_kwargs)
    refused = [name for name in _REFUSED if name in hf_kwargs] + (
        ["use_safetensors=False"] if hf_kwargs.get("use_safetensors") is False else []
    )
    if refused:
        raise ValueError(
            f"hf_zero.from_pretrained does not take {refused} at ZeRO stage 3: the engine places and shards "
            "the model itself, reading each rank's part of the safetensors weights. Leave them out (or load "
            "with a stage 0-2 config, where the model's own from_pretrained runs)"
        )
    kwargs = {k: v for k, v in hf_kwargs.items() if k not in (*_DOWNLOAD_ONLY, "use_safetensors")}
    folder = resolve_folder(
        name_or_path, kwargs.pop("cache_dir", None), kwargs.pop("revision", None), kwargs.pop("subfolder", "")
    )
    entries = read_headers(folder)
    ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
    key_mapping = kwargs.pop("key_mapping", None)
    requested_dtype = kwargs.pop("dtype", None)
    requested_dtype = kwargs.pop("torch_dtype", None) if requested_dtype is None else requested_dtype
    hf_config, model_kwargs = _load_config(model_class, folder, kwargs)
    dtype = _resolve_dtype(requested_dtype, hf_config, entries)
    model = _build_on_meta(model_class, hf_config, dtype, model_kwargs)
    weights = map_weights(model, entries, key_mapping)
    found = _check(model, weights, folder, ignore_mismatched)
    pending = PendingWeights()
    _untie_unequal(model, weights, found, pending)
    _finish(model, weights, found, pending, dtype)
    model.config.name_or_path = str(name_or_path)
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()  # as transformers returns it
    if len(pending):
        pending.attach(model)
    else:  # nothing left on disk: the folder filled none of the parameters
        pending.close()
    return model


def resolve_folder(
    name_or_path: str | os.PathLike,
    cache_dir: str | None = None,
    revision: str | None = None,
    subfolder: str = "",
) -> Path:
    """The local folder of `name_or_path`: itself, or its snapshot in the local Hugging Face cache.

    Raises `FileNotFoundError` naming it when it is neither (nothing is downloaded).
    """
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            path = Path(
                snapshot_download(
                    str(name_or_path), revision=revision, cache_dir=cache_dir, local_files_only=True
                )
            )
        except (HFValidationError, LocalEntryNotFoundError) as error:
            cache = cache_dir or constants.HF_HUB_CACHE
            raise FileNotFoundError(
                f"{str(name_or_path)!r} is neither a folder nor a model in the local Hugging Face cache ({cache}); "
                "hf_zero.from_pretrained reads local files only at stage 3. Pass the folder save_pretrained wrote, "
                f"or download the model first (`hf download {name_or_path}`)"
            ) from error
    folder = path / subfolder if subfolder else path
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(path)!r} has no subfolder {subfolder!r}")
    return folder


# ---- config, dtype, the model on the meta device -----------------------------------------------------


def _is_auto_class(model_class: Any) -> bool:
    return hasattr(model_class, "_model_mapping")


def _load_config(model_class: Any, folder: Path, kwargs: dict[str, Any]) -> tuple[PretrainedConfig, dict]:
    """The model's config and the keyword arguments left for the model (as transformers splits them)."""
    config = kwargs.pop("config", None)
    if isinstance(config, PretrainedConfig):
        return config, kwargs
    source = config if config is not None else folder
    if not _is_auto_class(model_class):
        kwargs.pop("trust_remote_code", None)
        return model_class.config_class.from_pretrained(source, return_unused_kwargs=True, **kwargs)
    trust = {key: kwargs.pop(key) for key in ("trust_remote_code",) if key in kwargs}
    config, rest = AutoConfig.from_pretrained(source, return_unused_kwargs=True, **trust, **kwargs)
    return config, {**rest, **trust}  # the Auto class's from_config needs it again


def _resolve_dtype(dtype: Any, config: PretrainedConfig, entries: dict[str, TensorEntry]) -> torch.dtype:
    """The dtype the model loads in, as transformers resolves it: the one asked for, or for
    "auto" (the default) the config's, else that of the first floating-point tensor in the file."""
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None)
        if dtype is None:
            floating = [
                e.dtype for e in entries.values() if e.dtype.is_floating_point and e.dtype.itemsize > 1
            ]
            dtype = floating[0] if floating else torch.get_default_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not allowed: expected 'auto' or a floating-point torch dtype")
    return dtype


def _build_on_meta(
    model_class: Any, config: PretrainedConfig, dtype: torch.dtype, model_kwargs: dict[str, Any]
) -> PreTrainedModel:
    """The model with every parameter and buffer on the meta device, untied and uninitialised (as
    transformers builds it before loading)."""
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            "this folder holds a quantised model, which hf_zero cannot shard at stage 3; load it with a stage "
            "0-2 config"
        )
    build = model_class.from_config if _is_auto_class(model_class) else model_class._from_config
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.device("meta"))
        stack.enter_context(hf_init.no_tie_weights())
        if hasattr(hf_init, "meta_device_safe_creation_ops"):
            stack.enter_context(hf_init.meta_device_safe_creation_ops())
        return build(config, dtype=dtype, **model_kwargs)


# ---- what the folder holds, checked -------------------------------------------------------------


def _check(model: PreTrainedModel, weights: WeightMap, folder: Path, ignore_mismatched: bool) -> set[str]:
    """Refuse shape mismatches and foreign tensors, by name; return the model keys the folder fills.

    A tensor the model has no place for is an error when the folder was saved from this very model
    class (file and config disagree). Saved from another architecture (a base model loaded with a
    task head, or the reverse), its extra tensors are that architecture's and are skipped.
    """
    cls = type(model).__name__
    for name, (file_keys, file_shape, model_shape) in weights.mismatched.items():
        if not ignore_mismatched:
            raise ValueError(
                f"{file_keys!r} in {folder} has shape {tuple(file_shape)}, but {cls}.{name} has shape "
                f"{tuple(model_shape)} (from the config): the weights and the config disagree. Fix the config, or "
                "pass ignore_mismatched_sizes=True to initialise it afresh instead"
            )
    if weights.mismatched:
        warnings.warn(
            f"{sorted(weights.mismatched)} differ in shape from {folder} and are newly initialised",
            stacklevel=3,
        )
    info = SimpleNamespace(missing_keys=set(), unexpected_keys=set(weights.unexpected))
    model._adjust_missing_and_unexpected_keys(info)  # what transformers never reports (old buffers, ...)
    unexpected = sorted(info.unexpected_keys)
    if unexpected:
        saved_from = list(getattr(model.config, "architectures", None) or [])
        listed = [
            f"{weights.unexpected[n].key!r} ({weights.unexpected[n].file.name})" for n in unexpected[:5]
        ]
        if not saved_from or cls in saved_from:
            raise ValueError(
                f"{folder} holds tensors that {cls} has no parameter or buffer for: {', '.join(listed)}. The "
                f"folder was saved from {cls} too, so its weights and its config disagree: check that they "
                "belong together, or remove those tensors"
            )
        warnings.warn(
            f"{folder} was saved from {saved_from[0]}; its tensors {', '.join(listed)} have no place in {cls} "
            "and are not loaded",
            stacklevel=3,
        )
    return set(weights.sources)


def _untie_unequal(
    model: PreTrainedModel, weights: WeightMap, found: set[str], pending: PendingWeights
) -> None:
    """Where the folder holds both of two tied weights, tie them only if they are equal (as
    transformers does); equal, the second is then left to the tying."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in list(tied.items()):
        if target in found and source in found:
            if _same_values(pending, weights.sources[target], weights.sources[source]):
                found.discard(target)
            else:
                warnings.warn(
                    f"{target} and {source} are tied in {type(model).__name__}, but the folder holds different "
                    "values for them, so they are not tied; set tie_word_embeddings=False in the config to "
                    "silence this",
                    stacklevel=4,
                )
                tied.pop(target)


def _same_values(pending: PendingWeights, a: tuple, b: tuple, chunk: int = 1 << 22) -> bool:
    """Whether two file values are equal, compared a bounded chunk at a time."""
    total = sum(piece.length for piece in a)
    if total != sum(piece.length for piece in b):
        return False
    dtype = torch.promote_types(a[0].entry.dtype, b[0].entry.dtype)
    for begin in range(0, total, chunk):
        length = min(chunk, total - begin)
        x = read_pieces(pending.reader, a, dtype, begin, length)
        if not torch.equal(x, read_pieces(pending.reader, b, dtype, begin, length)):
            return False
    return True


# ---- the model's tensors: pending, read, or initialised ---------------------------------------------


def _finish(
    model: PreTrainedModel, weights: WeightMap, found: set[str], pending: PendingWeights, dtype: torch.dtype
) -> None:
    """Read the persistent buffers the folder holds; make everything else the folder lacks real and
    initialise it with the model's own `_init_weights`; tie; record the parameters to read later."""
    fp32 = keep_in_fp32_matcher(model, dtype)
    expected = model.state_dict(keep_vars=True)
    param_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied = getattr(model, "all_tied_weights_keys", None) or {}

    def load_dtype(name: str, tensor: torch.Tensor) -> torch.dtype:
        return torch.float32 if fp32 is not None and fp32.search(name) else tensor.dtype

    for name in found:
        tensor = expected[name]
        tensor._is_hf_initialized = True  # transformers' init functions skip flagged tensors
        if name not in param_names:
            value = read_pieces(
                pending.reader, weights.sources[name], load_dtype(name, tensor), 0, tensor.numel()
            )
            _replace(model, name, value.view(tensor.shape), flagged=True)
    for target in tied:
        expected[target]._is_hf_initialized = True  # the tying replaces it
    missing = set(expected) - found
    non_persistent = [name for name, _ in model.named_non_persistent_buffers()]
    for name in sorted(missing - set(tied)) + non_persistent:
        tensor = model.get_parameter_or_buffer(name)
        if tensor.is_meta:
            _replace(model, name, torch.empty_like(tensor, device="cpu"), flagged=False)
    model.initialize_weights()
    model.tie_weights(missing_keys=missing, recompute_mapping=False)
    _warn_missing(model, missing - set(weights.mismatched), param_names)  # mismatches warned already
    for name in sorted(found & param_names):
        param = model.get_parameter(name)
        if param.is_meta and param not in pending:
            target = load_dtype(name, param)
            if target != param.dtype:
                param.data = torch.empty(param.shape, dtype=target, device="meta")
            pending.add(param, PendingParameter(name, target, weights.sources[name]))
    left = [name for name, p in model.named_parameters() if p.is_meta and p not in pending]
    left += [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(
            f"hf_zero.from_pretrained left {left[:5]} without values: please report this as a bug"
        )


def _replace(model: nn.Module, name: str, value: torch.Tensor, flagged: bool) -> None:
    """Give parameter or buffer `name` the real tensor `value`; a parameter keeps its identity
    (tied references and the model's other handles on it stay valid)."""
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent)
    if leaf in module._parameters:
        target = module._parameters[leaf]
        assign(target, value)
    else:
        module._buffers[leaf] = target = value
    if flagged:
        target._is_hf_initialized = True


def _warn_missing(model: PreTrainedModel, missing: set[str], param_names: set[str]) -> None:
    info = SimpleNamespace(missing_keys=set(missing), unexpected_keys=set())
    model._adjust_missing_and_unexpected_keys(info)
    reported = sorted(name for name in info.missing_keys if name in param_names)
    if reported:
        warnings.warn(
            f"{reported[:8]}{' ...' if len(reported) > 8 else ''} of {type(model).__name__} are not in the "
            "pretrained weights and are newly initialised; train the model before using it for predictions",
            stacklevel=4,
        )
