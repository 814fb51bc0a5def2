"""Reading a model for `hf-zero estimate`: a config.json, a model folder or a cached Hub id, built
on the meta device and counted as the engine lays it out (`ModelShape`)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

from .formulas import ModelShape


class EstimateError(ValueError):
    """Bad input to `hf-zero estimate`; the message names the problem and the fix."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings about configs it builds (unused tokens and the like)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_config(source: str | os.PathLike) -> Any:
    """The `transformers` config of a config.json file, a model folder, or a Hub id found in the
    local Hugging Face cache (nothing is downloaded). Raises `EstimateError` naming what is wrong."""
    from transformers import AutoConfig

    text = os.fspath(source)
    path = os.path.expanduser(text)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise EstimateError(
            f"{text} is a folder without a config.json; pass a model folder saved with save_pretrained, "
            "or the config.json itself"
        )
    exists = os.path.exists(path)
    if not exists and (not _HUB_ID.match(text) or text.endswith(".json")):
        raise EstimateError(f"{text}: no such file or folder; pass a config.json, a model folder or a Hub id")
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(path if exists else text, local_files_only=True)
    except OSError as error:
        if exists:
            raise EstimateError(f"cannot read a model config from {text}: {_first_line(error)}") from error
        from huggingface_hub import constants

        raise EstimateError(
            f"{text} is neither a file or folder here nor a Hub model id in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); fetch its config first (hf download {text} config.json) or pass a "
            "config.json or a model folder"
        ) from error
    except (ValueError, KeyError) as error:
        raise EstimateError(
            f"{text} is not a model config transformers knows ({_first_line(error)}); it needs a model_type "
            "such as 'llama' or 'gpt2'"
        ) from error


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _meta_model(config: Any) -> Any:
    """The model `config` describes, built on the meta device (no memory, no weights): the class its
    `architectures` names, else a causal LM, else a masked LM (BERT-type configs), else a
    sequence-to-sequence LM (T5-type), else the base model."""
    import torch
    import transformers

    candidates = [
        getattr(transformers, name, None) for name in (getattr(config, "architectures", None) or [])
    ]
    candidates = [c for c in candidates if c is not None and hasattr(c, "_from_config")]
    candidates += [
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForMaskedLM,
        transformers.AutoModelForSeq2SeqLM,
        transformers.AutoModel,
    ]
    failures = []
    for candidate in candidates:
        try:
            with _quiet_transformers(), torch.device("meta"):
                # Auto classes build with from_config, model classes with _from_config.
                build = getattr(candidate, "from_config", None) or candidate._from_config
                return build(config)
        except Exception as error:  # building an arbitrary architecture fails in many ways: report each
            failures.append(f"{getattr(candidate, '__name__', candidate)}: {_first_line(error)}")
    raise EstimateError(
        f"transformers cannot build a model for this {type(config).__name__} ({'; '.join(failures)[:300]}); "
        "pass the config of a causal LM, a masked LM or a base model transformers supports"
    )


def model_shape(config: Any) -> ModelShape:
    """Count `config`'s model as the engine lays it out: built on the meta device, unique tensors
    (tied weights once), split into units with the engine's own `find_units`."""
    from torch import nn

    from ...core.units import find_units
    from ...integrations.muon import hidden_matrix_names

    model = _meta_model(config)
    params = list(model.parameters())  # each tensor once, however often it is tied
    units = find_units(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def attribute(*names: str, default: int = 0) -> int:
        for name in names:
            value = getattr(text, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return default

    hidden = attribute("hidden_size", "d_model", "n_embd")
    heads = attribute("num_attention_heads", "n_head", default=1)
    head_dim = attribute("head_dim", default=max(1, hidden // heads))
    return ModelShape(
        parameters=sum(p.numel() for p in params),
        root_parameters=sum(p.numel() for p in units[0].params),
        unit_parameters=tuple(sum(p.numel() for p in unit.params) for unit in units[1:]),
        largest_root_tensor=max((p.numel() for p in units[0].params), default=0),
        largest_unit_tensor=max((p.numel() for unit in units[1:] for p in unit.params), default=0),
        hidden_size=hidden,
        num_layers=attribute("num_hidden_layers", "n_layer", "num_layers", default=len(units) - 1),
        num_heads=heads,
        kv_size=attribute("num_key_value_heads", default=heads) * head_dim,
        # GPT-2 names it n_inner and leaves it None for the usual 4 x hidden.
        intermediate_size=attribute("intermediate_size", "n_inner", "ffn_dim", "d_ff", default=4 * hidden),
        vocab_size=attribute("vocab_size"),
        name=type(model).__name__,
        input_embedding=sum(
            p.numel() for unit in units[1:] if isinstance(unit.module, nn.Embedding) for p in unit.params
        ),
        muon_shapes=tuple(tuple(model.get_parameter(name).shape) for name in hidden_matrix_names(model)),
    )
