"""The data side of a recipe: where the text comes from, the tokenizer, the tokenized datasets, the
collator and the evaluation metric for the recipe's task.

Sources (`data.source`):
    generated  the project's own English corpus (`hf_zero.cli.text_corpus`), written into
               `<output_dir>/data/` as the text or JSONL files a user would bring, then read
               through the same path as `files`
    files      local `train_files` / `eval_files`: .txt (one row per line), .json/.jsonl, .csv,
               .parquet, read with `datasets.load_dataset`
    hub        a `datasets` Hub dataset (`dataset`, `dataset_config`, `train_split`, `eval_split`)
    markov     token ids from a random Markov chain (causal-lm only; no tokenizer, fastest)

Tasks (`model.task`): `causal-lm` packs the text into `sequence_length` blocks; `masked-lm`
truncates each row to `sequence_length` and masks `mlm_probability` of its tokens
(`DataCollatorForLanguageModeling`); `sft` renders `prompt` (through the tokenizer's chat template
when it has one) and trains only on the `response` tokens.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.zero_config import did_you_mean
from .data import causal_lm_dataset, markov_corpus
from .text_corpus import write_corpus
from .tokenizer_training import train_tokenizer

TASKS = ("causal-lm", "masked-lm", "sft")
DATA_SOURCES = ("generated", "files", "hub", "markov")
_COMMON_FIELDS = {
    "source": "generated",
    "sequence_length": 128,
    "max_train_samples": None,
    "max_eval_samples": None,
    "mlm_probability": 0.15,
    "text_field": "text",
    "prompt_field": "prompt",
    "response_field": "response",
    "seed": 0,
}
SOURCE_FIELDS = {
    "generated": {"num_train": 4000, "num_eval": 200},
    "files": {"train_files": None, "eval_files": None},
    "hub": {"dataset": None, "dataset_config": None, "train_split": "train", "eval_split": None},
    "markov": {"num_sequences": 2048, "branching": 4, "eval_sequences": 128},
}
_FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
# What each task reports at evaluation, besides the loss.
ACCURACY_METRIC = {"causal-lm": "token_accuracy", "masked-lm": "masked_accuracy", "sft": "response_accuracy"}
SFT_PROMPT = "### Instruction:\n{prompt}\n### Response:\n"


def data_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The data section with every default of its source filled in."""
    source = data.get("source", _COMMON_FIELDS["source"])
    return {**_COMMON_FIELDS, **SOURCE_FIELDS.get(source, {}), **data}


def validate_data(data: dict[str, Any], task: str, where: str) -> None:
    """Check the data section before any process starts: known fields, a known source, the files
    it names exist, and a source that fits the task."""
    source = data.get("source", _COMMON_FIELDS["source"])
    if source not in DATA_SOURCES:
        raise ValueError(
            f"recipe {where}: data.source={source!r} is not allowed: expected one of {list(DATA_SOURCES)}"
        )
    if source == "markov" and task != "causal-lm":
        raise ValueError(
            f"recipe {where}: data.source=markov gives token ids for causal-lm only, and model.task={task!r}; "
            "use data.source=generated (text) or your own files"
        )
    # Fields of the other sources are accepted (and unused), so that `data.source=files` can
    # override a recipe written for generated data without clearing its fields one by one.
    valid = sorted({*_COMMON_FIELDS, *(name for fields in SOURCE_FIELDS.values() for name in fields)})
    unknown = [key for key in data if key not in valid]
    if unknown:
        raise ValueError(
            f"recipe {where}: unknown data field(s) {unknown}{did_you_mean(unknown[0], valid)}; fields are {valid}"
        )
    if source == "files":
        if not data.get("train_files"):
            raise ValueError(
                f"recipe {where}: data.source=files needs data.train_files (a path, glob or list)"
            )
        for key in ("train_files", "eval_files"):
            if data.get(key):
                resolve_files(data[key], f"data.{key}")
    if source == "hub" and not data.get("dataset"):
        raise ValueError(f"recipe {where}: data.source=hub needs data.dataset (a Hub dataset name)")
    fields = data_fields(data)
    if not isinstance(fields["sequence_length"], int) or fields["sequence_length"] < 8:
        raise ValueError(f"recipe {where}: data.sequence_length must be an integer of at least 8")
    if not 0 < float(fields["mlm_probability"]) < 1:
        raise ValueError(f"recipe {where}: data.mlm_probability must lie between 0 and 1")


def resolve_files(spec: str | list[str], what: str) -> list[str]:
    """The files a path, glob or list of them names; an error naming what is missing or unreadable."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    files = []
    for item in specs:
        path = os.path.expanduser(str(item))
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not matches or not all(os.path.isfile(match) for match in matches):
            raise FileNotFoundError(f"{what}: {item} does not exist (or matches no file)")
        files.extend(matches)
    suffixes = {Path(name).suffix.lower() for name in files}
    unknown = suffixes - set(_FILE_BUILDERS)
    if unknown:
        raise ValueError(
            f"{what}: cannot read files ending in {sorted(unknown)}; use one of {sorted(_FILE_BUILDERS)}"
        )
    if len({_FILE_BUILDERS[suffix] for suffix in suffixes}) > 1:
        raise ValueError(f"{what}: mixes file formats {sorted(suffixes)}; use one format per split")
    return files


@dataclass
class PreparedData:
    """What the Trainer needs from the data side."""

    train: Any
    evaluation: Any
    tokenizer: Any
    collator: Any
    description: str


def prepare_data(
    model: dict[str, Any],
    data: dict[str, Any],
    output_dir: str,
    is_main: bool,
    progress: bool = True,
    resuming_from: str | None = None,
) -> PreparedData:
    """Read (or generate) the data, get the tokenizer, tokenize for the task.

    Run it on the main process first and then on the others (`TrainingArguments.main_process_first`):
    the main process writes the generated files and trains and saves the tokenizer into
    `<output_dir>/tokenizer`; the others read what it wrote, so every rank has the same vocabulary.
    `progress=False` turns off the progress bars of `datasets` and `tokenizers` (for output that is
    not a terminal); the main process is the only one that shows them in any case. A run resuming
    from a checkpoint (`resuming_from`) takes the tokenizer saved in it rather than training one
    again: the checkpoint's weights were trained on that vocabulary.
    """
    import datasets

    task = model.get("task", "causal-lm")
    fields = data_fields(data)
    progress = progress and is_main
    if not progress:
        datasets.disable_progress_bars()
    if fields["source"] == "markov":
        return _markov(fields, model)
    raw = _load_raw(fields, task, output_dir)
    tokenizer = _tokenizer(model, task, raw["train"], fields, output_dir, is_main, progress, resuming_from)
    tokenized = {split: _tokenize(rows, task, tokenizer, fields) for split, rows in raw.items()}
    empty = [split for split, rows in tokenized.items() if len(rows) == 0]
    if empty:
        raise ValueError(
            f"the {empty[0]} data gave no training examples after tokenization (too little text for "
            f"data.sequence_length={fields['sequence_length']}?)"
        )
    return PreparedData(
        train=tokenized["train"],
        evaluation=tokenized.get("eval"),
        tokenizer=tokenizer,
        collator=_collator(task, tokenizer, fields),
        description=_describe(fields, raw),
    )


def _markov(fields: dict[str, Any], model: dict[str, Any]) -> PreparedData:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model["architecture"], **(model.get("config") or {}))
    total = fields["num_sequences"] + fields["eval_sequences"]
    tokens = markov_corpus(
        total, fields["sequence_length"], config.vocab_size, fields["branching"], fields["seed"]
    )
    train = causal_lm_dataset(tokens[: fields["num_sequences"]])
    evaluation = causal_lm_dataset(tokens[fields["num_sequences"] :]) if fields["eval_sequences"] else None
    return PreparedData(train, evaluation, None, None, describe_source(fields))


def describe_source(fields: dict[str, Any]) -> str:
    """A few words naming where a recipe's data comes from, for logs and the model card."""
    source = fields["source"]
    if source == "markov":
        return (
            f"generated Markov-chain token ids ({fields['num_sequences']} train / "
            f"{fields['eval_sequences']} eval sequences of {fields['sequence_length']} tokens)"
        )
    if source == "generated":
        return f"the generated hf_zero corpus ({fields['num_train']} train / {fields['num_eval']} eval rows)"
    if source == "files":
        evaluation = f", eval {fields['eval_files']}" if fields.get("eval_files") else ""
        return f"local files: train {fields['train_files']}{evaluation}"
    config = f" ({fields['dataset_config']})" if fields.get("dataset_config") else ""
    return f"Hub dataset {fields['dataset']}{config}"


def _describe(fields: dict[str, Any], raw: dict[str, Any]) -> str:
    if fields["source"] == "generated":
        kind = "sentences" if "text" in raw["train"].column_names else "question/answer pairs"
        return f"{describe_source(fields)}: English {kind} about a generated world, in data/"
    counts = " / ".join(f"{len(rows)} {split}" for split, rows in raw.items())
    return f"{describe_source(fields)}; {counts} rows"


def _load_raw(fields: dict[str, Any], task: str, output_dir: str) -> dict[str, Any]:
    import datasets

    if fields["source"] == "generated":
        kind = "instructions" if task == "sft" else "text"
        paths = write_corpus(
            Path(output_dir) / "data", kind, fields["num_train"], fields["num_eval"], fields["seed"]
        )
        fields = {
            **fields,
            "train_files": paths["train"],
            "eval_files": paths["eval"] if fields["num_eval"] else None,
        }
    if fields["source"] == "hub":
        splits = {"train": fields["train_split"]}
        if fields["eval_split"]:
            splits["eval"] = fields["eval_split"]
        raw = {
            split: datasets.load_dataset(fields["dataset"], fields["dataset_config"], split=name)
            for split, name in splits.items()
        }
    else:
        files = {"train": resolve_files(fields["train_files"], "data.train_files")}
        if fields.get("eval_files"):
            files["eval"] = resolve_files(fields["eval_files"], "data.eval_files")
        builder = _FILE_BUILDERS[Path(files["train"][0]).suffix.lower()]
        raw = {
            split: datasets.load_dataset(builder, data_files={split: names}, split=split)
            for split, names in files.items()
        }
    for split, limit in (("train", fields["max_train_samples"]), ("eval", fields["max_eval_samples"])):
        if split in raw and limit is not None:
            raw[split] = raw[split].select(range(min(int(limit), len(raw[split]))))
    needed = [fields["prompt_field"], fields["response_field"]] if task == "sft" else [fields["text_field"]]
    for split, rows in raw.items():
        missing = [name for name in needed if name not in rows.column_names]
        if missing:
            hint = "data.prompt_field / data.response_field" if task == "sft" else "data.text_field"
            raise ValueError(
                f"the {split} data has no column(s) {missing} (its columns are {rows.column_names}); "
                f"name the right ones with {hint}"
            )
    if task != "sft":
        # Blank lines in a text file are rows too; they carry nothing to learn.
        text = fields["text_field"]
        raw = {
            split: rows.filter(lambda row: bool(row[text] and row[text].strip()))
            for split, rows in raw.items()
        }
    return raw


def _tokenizer(
    model: dict[str, Any],
    task: str,
    train_rows,
    fields,
    output_dir: str,
    is_main: bool,
    progress: bool,
    resuming_from: str | None = None,
):
    from transformers import AutoTokenizer

    spec = tokenizer_spec(model)
    if (
        spec == "train"
        and resuming_from is not None
        and (Path(resuming_from) / "tokenizer_config.json").is_file()
    ):
        spec = resuming_from  # the vocabulary the checkpoint was trained with (the Trainer saved it there)
    if spec != "train":
        tokenizer = AutoTokenizer.from_pretrained(spec)
    else:
        folder = Path(output_dir) / "tokenizer"
        if is_main:
            text = fields["text_field"]
            if task == "sft":
                texts = (
                    f"{row[fields['prompt_field']]}\n{row[fields['response_field']]}" for row in train_rows
                )
            else:
                texts = (row[text] for row in train_rows)
            kind = "wordpiece" if task == "masked-lm" else "bpe"
            vocab_size = int(model.get("tokenizer_vocab_size", 2000))
            tokenizer = train_tokenizer(texts, kind, vocab_size, show_progress=progress)
            tokenizer.save_pretrained(folder)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # causal models without one pad with their end token
    if task == "masked-lm" and tokenizer.mask_token is None:
        raise ValueError(
            f"model.task=masked-lm needs a tokenizer with a mask token, and {spec} has none; "
            "use a BERT-style tokenizer or model.tokenizer=train"
        )
    return tokenizer


def tokenizer_spec(model: dict[str, Any]) -> str:
    """`train` (a tokenizer trained on the recipe's data, for a model built from a config) or the
    folder / Hub id to load one from: a pretrained model's own unless another is named."""
    spec = str(model.get("tokenizer") or "train")
    if spec == "train" and model.get("pretrained"):
        return str(model["pretrained"])
    return spec


def _tokenize(rows, task: str, tokenizer, fields: dict[str, Any]):
    length = fields["sequence_length"]
    columns = rows.column_names
    if task == "masked-lm":
        text = fields["text_field"]
        return rows.map(
            lambda batch: tokenizer(batch[text], truncation=True, max_length=length),
            batched=True,
            remove_columns=columns,
        )
    if task == "causal-lm":
        text = fields["text_field"]
        return rows.map(
            lambda batch: _pack(tokenizer(batch[text])["input_ids"], tokenizer.eos_token_id, length),
            batched=True,
            remove_columns=columns,
        )
    prompt, response = fields["prompt_field"], fields["response_field"]
    tokenized = rows.map(
        lambda row: _sft_example(tokenizer, row[prompt], row[response], length), remove_columns=columns
    )
    # An example whose response was cut off entirely teaches nothing (and its loss is undefined).
    return tokenized.filter(lambda row: any(label != -100 for label in row["labels"]))


def _pack(token_lists: list[list[int]], eos: int | None, length: int) -> dict[str, list[list[int]]]:
    """Concatenate the rows (each ended by `eos`) and cut the stream into `length`-token blocks;
    the tail of a batch that fills no whole block is dropped."""
    stream = []
    for tokens in token_lists:
        stream.extend(tokens)
        if eos is not None and (not tokens or tokens[-1] != eos):
            stream.append(eos)
    blocks = [stream[start : start + length] for start in range(0, len(stream) - length + 1, length)]
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}


def _sft_example(tokenizer, prompt: str, response: str, length: int) -> dict[str, list[int]]:
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        prompt_ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    else:
        prompt_ids = tokenizer(SFT_PROMPT.format(prompt=prompt))["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _collator(task: str, tokenizer, fields: dict[str, Any]):
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, default_data_collator

    if task == "masked-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=float(fields["mlm_probability"]))
    if task == "sft":
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return default_data_collator  # packed blocks all have the same length


def logits_for_metrics(task: str):
    """The `preprocess_logits_for_metrics` of the task: per token, the predicted id and the negative
    log-likelihood of the label, so evaluation keeps two numbers per token instead of the logits.
    For next-token tasks position t holds the prediction for token t+1."""

    def reduce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, tuple):
            logits = logits[0]
        logits = logits.float()
        if task != "masked-lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        target = labels.clamp(min=0)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        ).view(target.shape)
        reduced = torch.stack([logits.argmax(-1).float(), nll], dim=-1)
        if task != "masked-lm":  # keep the label's shape: the last position predicts nothing
            reduced = torch.nn.functional.pad(reduced, (0, 0, 0, 1))
        return reduced

    return reduce


def metrics_for(task: str):
    """The `compute_metrics` of the task: the accuracy of the predicted tokens where there is a
    label (the masked tokens, the next tokens, the response tokens) and the perplexity, the
    exponential of the mean negative log-likelihood over those same tokens."""
    name = ACCURACY_METRIC[task]

    def compute(prediction) -> dict[str, float]:
        reduced, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
        predicted, nll = reduced[..., 0], reduced[..., 1]
        if task != "masked-lm":
            predicted, nll, labels = predicted[:, :-1], nll[:, :-1], labels[:, 1:]
        mask = labels != -100
        if not mask.any():
            return {}
        return {
            name: float((predicted[mask] == labels[mask]).mean()),
            "perplexity": float(math.exp(min(float(nll[mask].mean()), 50.0))),
        }

    return compute
