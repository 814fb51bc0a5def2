"""Checkpoints resume exactly on the same layout and reshard onto other world sizes and stages.

The tiny GPT-2 (tied embeddings) trains 6 steps of global batch 4; checkpoints are taken after
step 3. A resume on the same world size and stage, in fresh processes, must give bit-identical
losses and weights (with dropout on too: each rank's random stream continues). A resume on
another world size or stage must continue the loss curve of an uninterrupted run on that new
layout, to fp32 reduction-order rounding.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_zero.cli.merge import merge_checkpoint
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import build_model, make_samples

STEPS, SAVE_AT = 6, 3

# (world size, jobs) in launch order: each launch may resume checkpoints earlier ones saved.
LAUNCHES = [
    (
        2,
        [
            {"name": "w2s1", "stage": 1, "save": "w2s1"},
            {"name": "w2s2", "stage": 2, "bucket": 2048, "save": "w2s2"},
            {"name": "w2s3", "stage": 3, "save": "w2s3"},
            {"name": "w2s2_dropout", "stage": 2, "dropout": 0.1, "save": "w2s2_dropout"},
            {"name": "s1_to_s2", "stage": 2, "bucket": 2048, "resume": "w2s1"},
            {"name": "s2_to_s3", "stage": 3, "resume": "w2s2"},
            {"name": "s3_to_s1", "stage": 1, "resume": "w2s3"},
            {"name": "w2s2_muon", "stage": 2, "optimizer": "muon_sgd", "save": "w2s2_muon"},
            {"name": "w2s3_adafactor", "stage": 3, "optimizer": "adafactor", "save": "w2s3_adafactor"},
        ],
    ),
    (
        4,
        [
            {"name": "w4s1", "stage": 1, "save": "w4s1"},
            {"name": "w2_to_w4", "stage": 1, "resume": "w2s1"},
            {"name": "w2s3_to_w4s2", "stage": 2, "resume": "w2s3"},
            {"name": "w4s2", "stage": 2},
            {"name": "w4s2_bf16", "stage": 2, "precision": "bf16", "save": "w4s2_bf16", "steps": SAVE_AT},
            {"name": "w4s3_save", "stage": 3, "save": "w4s3", "steps": SAVE_AT},
            {"name": "w2s2_to_w4s3_muon", "stage": 3, "optimizer": "muon_sgd", "resume": "w2s2_muon"},
        ],
    ),
    (
        2,
        [
            {"name": "exact_s2", "stage": 2, "bucket": 2048, "resume": "w2s2"},
            {"name": "exact_s3", "stage": 3, "resume": "w2s3"},
            {"name": "exact_s2_dropout", "stage": 2, "dropout": 0.1, "resume": "w2s2_dropout"},
            {"name": "w4_to_w2", "stage": 1, "resume": "w4s1"},
            {"name": "exact_s2_muon", "stage": 2, "optimizer": "muon_sgd", "resume": "w2s2_muon"},
            {"name": "exact_s3_adafactor", "stage": 3, "optimizer": "adafactor", "resume": "w2s3_adafactor"},
        ],
    ),
    (
        1,
        [
            {"name": "w1s1", "stage": 1},
            {"name": "w1s0", "stage": 0},
            {"name": "w2_to_w1", "stage": 1, "resume": "w2s1"},
            {"name": "w2s3_to_w1s0", "stage": 0, "resume": "w2s3"},
            {
                "name": "w2s3_to_w1s1_adafactor",
                "stage": 1,
                "optimizer": "adafactor",
                "resume": "w2s3_adafactor",
            },
        ],
    ),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def runs(root) -> dict[str, dict]:
    results = {}
    for index, (world, jobs) in enumerate(LAUNCHES):
        specs = []
        for job in jobs:
            spec = {key: value for key, value in job.items() if key not in ("save", "resume")}
            spec.setdefault("steps", STEPS)
            if "save" in job:
                spec.update(save_at=SAVE_AT, save_dir=str(root / job["save"]))
            if "resume" in job:
                spec["resume"] = str(root / job["resume"])
            specs.append(spec)
        out = root / f"launch{index}"
        out.mkdir()
        (out / "jobs.json").write_text(json.dumps(specs))
        launch = torchrun("hf_zero.testing.checkpoint_resume", world, [str(out / "jobs.json"), str(out)])
        (out / "stdout.txt").write_text(launch.stdout)
        for job in jobs:
            results[job["name"]] = torch.load(out / f"{job['name']}.pt")
    return results


def test_the_steps_after_the_checkpoint_move_the_weights_far_beyond_the_tolerance(runs):
    # So a resume that lost or mis-placed state (masters, Adam moments, step count) cannot pass.
    run = runs["w2s1"]
    moved = [(run["weights"][n] - run["saved_weights"][n]).abs().max().item() for n in run["weights"]]
    assert len(run["losses"]) == STEPS and min(moved) > 1e-4, moved


@pytest.mark.parametrize(
    "resumed, uninterrupted",
    [
        ("exact_s2", "w2s2"),
        ("exact_s3", "w2s3"),
        ("exact_s2_dropout", "w2s2_dropout"),
        ("exact_s2_muon", "w2s2_muon"),  # Muon's momentum, by element
        ("exact_s3_adafactor", "w2s3_adafactor"),  # Adafactor's state, whole at each owner
    ],
)
def test_same_layout_resume_is_bit_identical(runs, resumed, uninterrupted):
    resume, full = runs[resumed], runs[uninterrupted]
    assert resume["start"] == SAVE_AT
    assert resume["losses"] == full["losses"][SAVE_AT:]
    assert resume["weights"].keys() == full["weights"].keys()
    for name, value in full["weights"].items():
        assert torch.equal(resume["weights"][name], value), name


@pytest.mark.parametrize(
    "resumed, uninterrupted",
    [
        ("s1_to_s2", "w2s2"),
        ("s2_to_s3", "w2s3"),
        ("s3_to_s1", "w2s1"),
        ("w2_to_w4", "w4s1"),
        ("w2s3_to_w4s2", "w4s2"),
        ("w4_to_w2", "w2s1"),
        ("w2_to_w1", "w1s1"),
        ("w2s3_to_w1s0", "w1s0"),
    ],
)
def test_resharded_resume_continues_the_new_layouts_curve(runs, resumed, uninterrupted):
    resume, full = runs[resumed], runs[uninterrupted]
    assert resume["start"] == SAVE_AT
    torch.testing.assert_close(resume["losses"], full["losses"][SAVE_AT:], rtol=1e-6, atol=1e-6)
    for name, value in full["weights"].items():
        torch.testing.assert_close(resume["weights"][name], value, rtol=0, atol=2e-6, msg=name)


def test_a_resume_on_another_layout_says_once_what_was_resharded(runs, root):
    def lines(launch: int) -> list[str]:
        stdout = (root / f"launch{launch}" / "stdout.txt").read_text()
        return [line for line in stdout.splitlines() if "resharded" in line]

    # Rank 0 alone says it (two ranks would print it twice); same-layout resumes say nothing.
    assert lines(0) == [
        "hf_zero: resharded w2s1: saved by 2 processes at stage 1, loaded into 2 processes at stage 2",
        "hf_zero: resharded w2s2: saved by 2 processes at stage 2, loaded into 2 processes at stage 3",
        "hf_zero: resharded w2s3: saved by 2 processes at stage 3, loaded into 2 processes at stage 1",
    ]
    assert lines(2) == [
        "hf_zero: resharded w4s1: saved by 4 processes at stage 1, loaded into 2 processes at stage 1"
    ]
    assert lines(3) == [
        "hf_zero: resharded w2s1: saved by 2 processes at stage 1, loaded into 1 process at stage 1",
        "hf_zero: resharded w2s3: saved by 2 processes at stage 3, loaded into 1 process at stage 0",
        "hf_zero: resharded w2s3_adafactor: saved by 2 processes at stage 3, loaded into 1 process at stage 1",
    ]


def test_a_trainer_checkpoint_is_named_by_its_checkpoint_folder(tmp_path):
    from hf_zero.checkpoint.load import _reshard_note

    folder = tmp_path / "checkpoint-20" / "hf_zero_checkpoint"
    assert _reshard_note(folder, {"world_size": 2, "stage": 2}, 3, 3) == (
        "resharded checkpoint-20: saved by 2 processes at stage 2, loaded into 3 processes at stage 3"
    )
    assert _reshard_note(folder, {"world_size": 3, "stage": 3}, 3, 3) is None


def test_each_rank_reads_only_its_own_elements(runs, root):
    # Resumed on 4 ranks from 2: rank 0 read its quarter of the masters and both Adam moments (plus
    # its share of padding-free runs), not the files of the checkpoint.
    checkpoint_bytes = sum(p.stat().st_size for p in (root / "w2s1").glob("rank-*.safetensors"))
    read = runs["w2_to_w4"]["loaded_bytes"]
    assert 0.2 * checkpoint_bytes < read < 0.3 * checkpoint_bytes, (read, checkpoint_bytes)
    assert 0.45 * checkpoint_bytes < runs["w4_to_w2"]["loaded_bytes"] < 0.55 * checkpoint_bytes


@pytest.mark.parametrize("saved", ["w4s1", "w4s2_bf16", "w4s3", "w2s2_muon", "w2s3_adafactor"])
def test_merge_of_a_four_rank_checkpoint_equals_full_state_dict(runs, root, tmp_path, saved):
    # (and of two-rank checkpoints of Muon with SGD, and of Adafactor's state kept whole at owners)
    job = {"w4s1": "w4s1", "w4s2_bf16": "w4s2_bf16", "w4s3": "w4s3_save"}.get(saved, saved)
    expected = runs[job]["saved_weights"]
    result = merge_checkpoint(root / saved, tmp_path / "merged", max_shard_size="100KB")
    assert len(result["files"]) > 1 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    merged = {}
    for name in result["files"]:
        merged.update(load_file(tmp_path / "merged" / name))
    # Tied lm_head.weight is written once, under transformer.wte.weight, as save_pretrained does.
    assert merged.keys() == expected.keys() - {"lm_head.weight"}
    for name, value in merged.items():
        assert value.dtype == expected[name].dtype == torch.float32, name
        assert torch.equal(value, expected[name]), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    reference = build_model("gpt2")
    reference.load_state_dict(expected)
    batch = make_samples("gpt2", 2)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(batch).logits, reference(batch).logits)


@pytest.mark.parametrize(
    "resumed, saved, loss_rtol, weight_tol",
    [
        # Adafactor's factored moments, saved whole by each of 2 ranks for the parameters it owned,
        # read by the new owners on 1 rank (stage 1): fp32 reduction-order rounding only.
        ("w2s3_to_w1s1_adafactor", "w2s3_adafactor", 1e-6, 1e-4),
        # Muon's momentum, saved by element from 2 ranks' shards, on 4 ranks (other owners, stage 3).
        # Newton–Schulz runs in bf16, where other sums' last bits flip roundings: measured
        # 0.0092-0.0098 (2026-12-06), against 0.99 for a resume that loses the momentum.
        ("w2s2_to_w4s3_muon", "w2s2_muon", 1e-4, 0.03),
    ],
)
def test_matrix_optimizers_resume_on_another_number_of_ranks(runs, resumed, saved, loss_rtol, weight_tol):
    """The resumed run's steps continue those of the 2 ranks that saved the checkpoint: what they
    moved the weights by matches, relative to how far they moved them."""
    resume, full = runs[resumed], runs[saved]
    assert resume["start"] == SAVE_AT
    torch.testing.assert_close(resume["losses"], full["losses"][SAVE_AT:], rtol=loss_rtol, atol=0)
    names = list(full["weights"])
    moved = torch.cat([(full["weights"][n] - full["saved_weights"][n]).flatten() for n in names])
    diff = torch.cat([(resume["weights"][n] - full["weights"][n]).flatten() for n in names])
    assert diff.norm() < weight_tol * moved.norm(), (diff.norm() / moved.norm()).item()
