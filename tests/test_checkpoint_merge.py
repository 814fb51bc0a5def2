"""`hf-zero merge` and `hf-zero merge --verify` on checkpoints saved in this process (world size 1).

Merging checkpoints saved on 4 ranks at stages 1-3 is checked against `full_state_dict` in
`test_checkpoint_resume.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import hf_zero
from hf_zero.checkpoint.format import TRAINER_SUBFOLDER, rank_file_name
from hf_zero.cli import main
from hf_zero.testing.tiny_models import build_model, make_samples


def _hf_zero(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hf_zero.cli", *args], capture_output=True, text=True, timeout=300
    )


def _trained_checkpoint(folder, name: str = "gpt2", precision: str = "fp32", stage: int = 1) -> dict:
    model = build_model(name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine = hf_zero.initialize(model, optimizer, {"stage": stage, "precision": precision})
    engine.backward(engine(**make_samples(name, 2)).loss)
    engine.step()
    engine.save_checkpoint(folder)
    return engine.full_state_dict()


def test_merge_casts_copies_tokenizer_files_and_reads_a_trainer_checkpoint_folder(tmp_path):
    checkpoint = tmp_path / "checkpoint-1"
    weights = _trained_checkpoint(checkpoint / TRAINER_SUBFOLDER, precision="bf16")
    (checkpoint / "tokenizer.json").write_text("{}")
    result = _hf_zero("merge", str(checkpoint), str(tmp_path / "merged"), "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(value.dtype == torch.bfloat16 for value in merged.values())
    assert all(torch.equal(value, weights[name].to(torch.bfloat16)) for name, value in merged.items())
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert (tmp_path / "merged" / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.dtype == torch.bfloat16
    card = (tmp_path / "merged" / "README.md").read_text()
    assert (
        "merged from" in card
        and "- saved weights: bfloat16" in card
        and "AutoTokenizer" in card
        and "$" not in card
    )


def test_verify_summarises_a_good_checkpoint_and_names_a_damaged_file(tmp_path, capsys):
    # The command's own code in this process; the test above runs it as a command.
    _trained_checkpoint(tmp_path / "checkpoint", stage=2)
    assert main(["merge", "--verify", str(tmp_path / "checkpoint")]) == 0
    out = capsys.readouterr().out
    assert "every checksum matches" in out and "trainable_parameters" in out
    shard = tmp_path / "checkpoint" / rank_file_name(0, 1)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size: only the SHA-256 tells
    shard.write_bytes(bytes(data))
    assert main(["merge", "--verify", str(tmp_path / "checkpoint")]) == 1
    error = capsys.readouterr().err
    assert rank_file_name(0, 1) in error and "SHA-256" in error
    assert main(["merge", str(tmp_path / "checkpoint"), str(tmp_path / "merged")]) == 1
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_an_adapter_checkpoint_and_a_non_empty_output(tmp_path, capsys):
    _trained_checkpoint(tmp_path / "lora", name="gpt2-lora")
    assert main(["merge", str(tmp_path / "lora"), str(tmp_path / "out")]) == 1
    assert "PEFT model" in capsys.readouterr().err
    _trained_checkpoint(tmp_path / "gpt2")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert main(["merge", str(tmp_path / "gpt2"), str(tmp_path / "busy")]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert main(["merge", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "holds no hf_zero checkpoint" in capsys.readouterr().err
    # A mistyped path is named as missing, not as a folder without a checkpoint.
    assert main(["merge", "--verify", str(tmp_path / "gtp2")]) == 1
    error = capsys.readouterr().err
    assert "gtp2' does not exist" in error and "holds no hf_zero checkpoint" not in error
    assert main(["merge", str(tmp_path / "gpt2" / "manifest.json"), str(tmp_path / "out")]) == 1
    assert "is a file, not a checkpoint folder" in capsys.readouterr().err


_MEASURE = textwrap.dedent(
    """
    import json, sys
    from hf_zero.cli.merge import merge_checkpoint

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current size
    before = status("VmRSS:")
    result = merge_checkpoint(sys.argv[1], sys.argv[2], max_shard_size="4MB")
    print(json.dumps({"growth": status("VmHWM:") - before, "files": result["files"]}))
    """
)


def test_merge_streams_holding_about_one_output_file(tmp_path):
    # Big enough that the merge's fixed overhead (5-9 MiB of RSS, more on a loaded machine) stays
    # well inside the bound: holding the model would be 4 times over it.
    config = GPT2Config(n_layer=24, n_embd=256, n_head=4, vocab_size=1024, n_positions=64)
    model = GPT2LMHeadModel(config)
    model_bytes = sum(p.numel() for p in model.parameters()) * 4
    assert model_bytes > 70 * 2**20
    engine = hf_zero.initialize(model, torch.optim.AdamW(model.parameters()), {"stage": 1})
    engine.save_checkpoint(tmp_path / "checkpoint")
    expected = engine.full_state_dict()
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "checkpoint"), str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(measured["files"]) > 5
    # One 4 MB output file plus the tensor being read, not the ~75 MB model.
    print(
        f"merge peak RSS growth {measured['growth'] / 2**20:.1f} MiB for a {model_bytes / 2**20:.1f} MiB model"
    )
    assert measured["growth"] < 0.25 * model_bytes, (measured["growth"], model_bytes)
    merged = {}
    for name in measured["files"]:
        merged.update(load_file(tmp_path / "merged" / name))
    assert merged.keys() == expected.keys() - {"lm_head.weight"}
    assert all(torch.equal(value, expected[name]) for name, value in merged.items())


@pytest.mark.parametrize("bad", ["fp8", None])
def test_merge_api_refuses_an_unknown_dtype(tmp_path, bad):
    from hf_zero.cli.merge import merge_checkpoint

    _trained_checkpoint(tmp_path / "checkpoint")
    if bad is None:
        result = merge_checkpoint(tmp_path / "checkpoint", tmp_path / "fp16", dtype="fp16")
        assert result["dtype"] == "float16"
        return
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of"):
        merge_checkpoint(tmp_path / "checkpoint", tmp_path / "out", dtype=bad)
