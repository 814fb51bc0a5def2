"""The recipes' data side: the generated corpus, packing, SFT label masks, the evaluation metrics
and the model card, each checked against a direct computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_zero.cli.recipe_data import _pack, _sft_example, logits_for_metrics, metrics_for, prepare_data
from hf_zero.cli.text_corpus import documents, instructions, world, write_corpus
from hf_zero.cli.tokenizer_training import train_tokenizer
from hf_zero.hub.model_card import MARKER, render_card, write_card


def test_generated_corpus_is_english_about_one_fixed_world(tmp_path):
    people = {person.name: person for person in world(0)}
    lines = documents(50, seed=0)
    assert lines == documents(50, seed=0) and lines != documents(50, seed=1)
    # Every fact stated agrees with the world: "X lives in T" always names X's town.
    for line in lines:
        for sentence in line.split(" . "):
            words = sentence.split()
            if len(words) == 4 and words[1:3] == ["lives", "in"]:
                assert people[words[0]].town == words[3]
    pairs = instructions(20, seed=0)
    assert all(
        pair["response"].startswith(pair["prompt"].split()[-2]) or "?" in pair["prompt"] for pair in pairs
    )
    paths = write_corpus(tmp_path, "instructions", 10, 5)
    rows = [json.loads(line) for line in Path(paths["eval"]).read_text().splitlines()]
    assert len(rows) == 5 and set(rows[0]) == {"prompt", "response"}
    before = (tmp_path / "train.jsonl").stat().st_mtime_ns
    write_corpus(tmp_path, "instructions", 10, 5)  # same content: the file is kept, not rewritten
    assert (tmp_path / "train.jsonl").stat().st_mtime_ns == before


def test_packing_keeps_every_token_in_order_and_ends_documents():
    packed = _pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos=0, length=4)
    assert packed["input_ids"] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert packed["labels"] == packed["input_ids"]
    assert _pack([[1, 2, 3]], eos=0, length=8)["input_ids"] == []  # no whole block: dropped


def test_sft_examples_train_on_the_response_only():
    tokenizer = train_tokenizer(documents(200), "bpe", 500)
    example = _sft_example(tokenizer, "where does anna live ?", "anna lives in paris .", 64)
    labels, ids = example["labels"], example["input_ids"]
    prompt_length = labels.count(-100)
    assert prompt_length > 5 and labels[prompt_length:] == ids[prompt_length:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_length:-1]).strip() == "anna lives in paris ."
    assert "### Response:" in tokenizer.decode(ids[:prompt_length])
    cut = _sft_example(tokenizer, "where does anna live ?", "anna lives in paris .", prompt_length + 2)
    assert (
        len(cut["input_ids"]) == prompt_length + 2
        and cut["labels"][-2:] == ids[prompt_length : prompt_length + 2]
    )


@pytest.mark.parametrize("task", ["causal-lm", "masked-lm", "sft"])
def test_accuracy_and_perplexity_match_a_direct_computation(task):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    reduced = logits_for_metrics(task)(logits, labels)
    metrics = metrics_for(task)(EvalPrediction(predictions=reduced.numpy(), label_ids=labels.numpy()))
    # Directly: next-token tasks compare position t's prediction with token t+1.
    if task == "masked-lm":
        scores, targets = logits, labels
    else:
        scores, targets = logits[:, :-1], labels[:, 1:]
    mask = targets != -100
    expected_accuracy = (scores.argmax(-1)[mask] == targets[mask]).float().mean().item()
    expected_perplexity = math.exp(torch.nn.functional.cross_entropy(scores[mask], targets[mask]).item())
    name = {"causal-lm": "token_accuracy", "masked-lm": "masked_accuracy", "sft": "response_accuracy"}[task]
    assert metrics[name] == pytest.approx(expected_accuracy, abs=1e-6)
    assert metrics["perplexity"] == pytest.approx(expected_perplexity, rel=1e-5)


def test_files_source_names_a_missing_column(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n' * 4)
    with pytest.raises(ValueError, match=r"no column\(s\) \['prompt', 'response'\].*data.prompt_field"):
        prepare_data(
            {"architecture": "llama", "task": "sft"},
            {"source": "files", "train_files": str(data)},
            str(tmp_path / "out"),
            is_main=True,
        )


def test_a_model_card_has_no_empty_field_whatever_is_known(tmp_path):
    sparse = render_card({"title": "run"})
    full = render_card(
        {
            "title": "run",
            "model_type": "bert",
            "task": "masked-lm",
            "parameters": 1_234_567,
            "config": {"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 500},
            "data": "files",
            "zero": {"stage": 3, "offload_optimizer": "cpu"},
            "steps": 10,
            "metrics": {"eval_masked_accuracy": 0.5, "eval_perplexity": 3.0},
            "curve": "curves.png",
            "recipe": "model: {}\n",
            "has_tokenizer": True,
        }
    )
    for card in (sparse, full):
        assert "$" not in card and "None" not in card
        sections = card.split("\n## ")[1:]
        assert all(section.partition("\n")[2].strip() for section in sections)
    assert "## Results" not in sparse and "## Model\n" not in sparse and "## How to load it" in sparse
    assert (
        "ZeRO stage 3, offloading optimizer state to cpu" in full and "| eval_masked_accuracy | 0.5 |" in full
    )
    assert "AutoModelForMaskedLM.from_pretrained" in full and "AutoTokenizer" in full
    assert "pipeline_tag: fill-mask" in full and "- layers: 2" in full
    # A README the user wrote stays; one hf_zero wrote is replaced.
    (tmp_path / "README.md").write_text("# mine\n")
    assert (
        write_card(tmp_path, {"title": "run"}) is None and (tmp_path / "README.md").read_text() == "# mine\n"
    )
    (tmp_path / "README.md").write_text(f"{MARKER} -->\nold\n")
    assert (
        write_card(tmp_path, {"title": "run"}) is not None
        and "old" not in (tmp_path / "README.md").read_text()
    )


def test_trained_tokenizers_round_trip_text():
    texts = documents(200)
    bpe = train_tokenizer(texts, "bpe", 600)
    assert bpe.decode(bpe(texts[0])["input_ids"]) == texts[0]
    wordpiece = train_tokenizer(texts, "wordpiece", 600)
    ids = wordpiece(texts[0])["input_ids"]
    assert ids[0] == wordpiece.cls_token_id and ids[-1] == wordpiece.sep_token_id
    assert wordpiece.mask_token_id is not None and np.all(np.asarray(ids) != wordpiece.unk_token_id)


@pytest.mark.parametrize("form", ["csv", "parquet", "hub"])
def test_causal_lm_reads_csv_parquet_and_datasets_folders(tmp_path, form):
    import datasets

    rows = documents(120, seed=3)
    table = datasets.Dataset.from_dict({"body": rows, "other": list(range(len(rows)))})
    source = tmp_path / "source"
    source.mkdir()
    if form == "hub":
        # A Hub dataset name resolves as `datasets.load_dataset(name)`: a folder of split files is one.
        table.to_parquet(source / "train.parquet")
        table.select(range(20)).to_parquet(source / "validation.parquet")
        data = {"source": "hub", "dataset": str(source), "eval_split": "validation"}
    else:
        write = table.to_csv if form == "csv" else table.to_parquet
        write(source / f"part-1.{form}")
        data = {"source": "files", "train_files": str(source / f"*.{form}")}
    prepared = prepare_data(
        {"architecture": "gpt2", "task": "causal-lm"},
        {**data, "text_field": "body", "sequence_length": 16},
        str(tmp_path / "out"),
        is_main=True,
    )
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
    blocks = prepared.train["input_ids"]
    assert all(len(block) == 16 for block in blocks) and prepared.train["labels"] == blocks
    tokenizer = prepared.tokenizer
    stream = [token for block in blocks for token in block]
    first = tokenizer(rows[0])["input_ids"] + [tokenizer.eos_token_id]
    assert stream[: len(first)] == first  # the rows, in order, each ended by the end token
    assert len(stream) > 0.9 * sum(len(tokenizer(row)["input_ids"]) + 1 for row in rows)
    assert (prepared.evaluation is not None) == (form == "hub")
