"""`hf-zero merge`: a checkpoint into a normal `save_pretrained` folder, in one CPU process.

The weights stream: one tensor at a time is read from whatever rank files hold its pieces and
handed to a writer that closes an output file before the next tensor would take it past
`max_shard_size`, so the host holds about one output file's worth, not the model. No process
group, no GPU and no model object are needed: the manifest carries the model's config.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers.utils.hub import convert_file_size_to_int

from ..checkpoint.format import (
    TRAINER_SUBFOLDER,
    CheckpointError,
    check_files,
    checksum_mismatch,
    dtype_name,
    dtype_of,
    read_manifest,
    resolve_checkpoint,
)
from ..checkpoint.reader import SpanReader
from ..hub.model_card import last_metrics, task_of_class, write_card
from ..hub.saving import WeightFileWriter

MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Files a tokenizer's save_pretrained writes, copied from a Trainer checkpoint into the merged folder.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "vocab.*",
    "*.model",
    "chat_template.*",
)


def _checkpoint_folder(path: str | os.PathLike) -> Path:
    """The folder holding the checkpoint's manifest (`path`, or its `hf_zero_checkpoint/`), with an
    error that says what is wrong with a path that does not exist or is not a folder."""
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"checkpoint folder {str(given)!r} does not exist; check the path")
    if not given.is_dir():
        raise NotADirectoryError(
            f"{str(given)!r} is a file, not a checkpoint folder; pass the folder that holds manifest.json "
            "(or the Trainer's checkpoint-N folder)"
        )
    return resolve_checkpoint(given)


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint's manifest and every file's size and SHA-256; return a summary of it.

    Raises `CheckpointError` (or `FileNotFoundError`) naming the first file at fault.
    """
    folder = _checkpoint_folder(path)
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    for name in sorted(manifest["files"]):
        problem = checksum_mismatch(folder, manifest, name)
        if problem:
            raise CheckpointError(problem)
    tensors = manifest["tensors"]
    return {
        "checkpoint": str(folder),
        "world_size": manifest["world_size"],
        "stage": manifest["stage"],
        "precision": manifest.get("precision"),
        "global_steps": manifest.get("global_steps"),
        "model": manifest.get("model", {}).get("class"),
        "tensors": len(tensors),
        "parameters": sum(torch.Size(r["shape"]).numel() for r in tensors if r["kind"] != "buffer"),
        "trainable_parameters": sum(
            torch.Size(r["shape"]).numel() for r in tensors if r["kind"] == "trainable"
        ),
        "files": len(manifest["files"]),
        "bytes": sum(info["bytes"] for info in manifest["files"].values()),
    }


def merge_checkpoint(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
) -> dict[str, Any]:
    """Write the checkpoint at `path` (a checkpoint folder, or a ZeroTrainer/ZeroAccelerator
    checkpoint holding one) as a `save_pretrained` folder `output_dir` that `from_pretrained` loads.

    Weights come out in the dtype the model had (the fp32 masters for a model handed over in fp32,
    so the result equals `engine.full_state_dict()`), or with `dtype` ("fp32", "bf16", "fp16")
    every floating-point tensor cast to it. `config.json`, `generation_config.json` and tokenizer
    files found beside the checkpoint come along. The folder appears complete or not at all.
    Returns the files written, their total size and the most weight bytes held at once.
    """
    folder = _checkpoint_folder(path)
    verify_checkpoint(folder)
    manifest = read_manifest(folder)
    model = manifest.get("model", {})
    if model.get("peft"):
        raise CheckpointError(
            f"{folder} is the checkpoint of a PEFT model: its adapter folder is what to keep (the Trainer "
            "writes it beside the checkpoint; otherwise use the PEFT model's save_pretrained)"
        )
    if not manifest.get("frozen_included", True):
        raise CheckpointError(f"{folder} leaves the frozen weights out, so it cannot make a complete model")
    if "config" not in model:
        raise CheckpointError(
            f"{folder} has no model config: only a Hugging Face model (a PreTrainedModel) can be merged into "
            "a from_pretrained folder"
        )
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(MERGE_DTYPES)}")
    out = Path(output_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; merge into a new folder (or remove it first)")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        written = _write_weights(folder, manifest, temporary, dtype, convert_file_size_to_int(max_shard_size))
        _write_configs(model, temporary, written["dtype"])
        _copy_tokenizer(folder, temporary)
        has_tokenizer = any(
            (temporary / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
        )
        facts = _card_facts(folder, manifest, out, dtype_name(written["dtype"]))
        write_card(temporary, {**facts, "has_tokenizer": has_tokenizer})
        if out.exists():
            out.rmdir()
        os.replace(temporary, out)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return {**written, "dtype": dtype_name(written["dtype"]), "output_dir": str(out)}


def _write_weights(
    folder: Path, manifest: dict[str, Any], out: Path, dtype: str | None, max_bytes: int
) -> dict[str, Any]:
    writer = WeightFileWriter(out, max_bytes)
    reader = SpanReader(folder, manifest)
    cast = MERGE_DTYPES.get(dtype) if dtype else None
    model_dtype = None
    try:
        for record in manifest["tensors"]:
            target = dtype_of(record["dtype"])
            if cast is not None and target.is_floating_point:
                target = cast
            if record["kind"] == "trainable" and model_dtype is None:
                model_dtype = target
            writer.add(record["name"], reader.read_whole(record).to(target))
        writer.finish()
    finally:
        reader.close()
    return {
        "files": sorted(path.name for path in out.glob("model*.safetensors")),
        "total_size": writer.total_bytes,
        "peak_host_bytes": writer.peak_host_bytes,
        "dtype": model_dtype or cast or torch.float32,
    }


def _write_configs(model: dict[str, Any], out: Path, dtype: torch.dtype) -> None:
    """`config.json` naming the class and the dtype the weights were written in (so `from_pretrained`
    loads them as they are), and the generation config when the model had one."""
    config = dict(model["config"])
    if not config.get("architectures"):
        config["architectures"] = [model["class"]]
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype"]
    for key in keys:
        config[key] = dtype_name(dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.get("generation_config"):
        (out / "generation_config.json").write_text(
            json.dumps(model["generation_config"], indent=2, sort_keys=True) + "\n"
        )


def _copy_tokenizer(folder: Path, out: Path) -> None:
    """Tokenizer files in the checkpoint folder, or in the Trainer checkpoint folder around it."""
    sources = [folder] + ([folder.parent] if folder.name == TRAINER_SUBFOLDER else [])
    for source in sources:
        for pattern in _TOKENIZER_FILES:
            for path in source.glob(pattern):
                if path.is_file() and not (out / path.name).exists():
                    shutil.copy2(path, out / path.name)


def _card_facts(folder: Path, manifest: dict[str, Any], out: Path, dtype: str) -> dict[str, Any]:
    """What the checkpoint says about its model for the merged folder's card; a Trainer checkpoint
    around it adds the run's last metrics and batch settings (`trainer_state.json`)."""
    model = manifest.get("model", {})
    config = model.get("config") or {}
    facts: dict[str, Any] = {
        "title": out.name,
        "load_path": str(out),
        "model_class": model.get("class"),
        "model_type": config.get("model_type"),
        "config": config,
        "parameters": sum(
            torch.Size(r["shape"]).numel() for r in manifest["tensors"] if r["kind"] != "buffer"
        ),
        "task": task_of_class(model.get("class") or ""),
        "zero": {"stage": manifest["stage"]},
        "precision": manifest.get("precision"),
        "world_size": manifest["world_size"],
        "steps": manifest.get("global_steps"),
        "checkpoint": f"merged from {folder} with hf-zero merge",
        "weights_dtype": dtype,
    }
    state_file = folder.parent / "trainer_state.json" if folder.name == TRAINER_SUBFOLDER else None
    if state_file is not None and state_file.is_file():
        state = json.loads(state_file.read_text())
        facts["metrics"] = last_metrics(state.get("log_history", []), "loss")
        facts["epochs"] = round(state["epoch"], 2) if state.get("epoch") else None
    return facts
