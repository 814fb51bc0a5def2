"""`hf_zero.from_pretrained`: each rank reads only its shard of a `save_pretrained` folder.

The multi-rank checks (2 and 4 gloo ranks, one torchrun launch per world size) live in
`hf_zero.testing.loading_checks`; the rest runs in this process, a world of one.
"""

from __future__ import annotations

import functools
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    LlamaModel,
)

import hf_zero
from hf_zero.hub.weights import load_pretrained_weights
from hf_zero.testing.cases import build_optimizer
from hf_zero.testing.launch import torchrun
from hf_zero.testing.loading_checks import FOLDERS
from hf_zero.testing.tiny_models import build_model, make_samples

STAGE3 = {"stage": 3, "reduce_bucket_size": 6000}
WORLDS = [2, 4]


# ---- 2 and 4 ranks ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Per world size, every rank's report of `hf_zero.testing.loading_checks` (launched on first use)."""

    @functools.cache
    def reports(world: int) -> list[dict]:
        out = tmp_path_factory.mktemp(f"loading{world}")
        torchrun("hf_zero.testing.loading_checks", world, [str(out)])
        return json.loads((out / "report.json").read_text())

    return reports


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("folder", list(FOLDERS))
def test_values_are_the_files_tensors_exactly(launched, world, folder):
    for rank in launched(world):
        result = rank["values"][folder]
        assert result["file_matches_reference"]  # transformers reads the same values from the file
        assert result["exact"] and result["buffers_equal"]
        if folder == "gpt2":
            assert result["tied"]  # lm_head.weight is transformer.wte.weight, one parameter


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("folder", list(FOLDERS))
def test_each_rank_reads_its_own_shard_of_the_weights(launched, world, folder):
    results = [rank["values"][folder] for rank in launched(world)]
    weights = results[0]["weight_bytes"]
    # Every byte of the weights is read exactly once, by the rank that keeps it ...
    assert sum(r["loaded_bytes"] for r in results) == weights
    # ... and no rank reads more than its shard: 1/N of the weights plus the layout's padding
    # (64-element alignment, buckets padded to N·64 elements), 0.4-0.5% for these models.
    for result in results:
        assert result["loaded_bytes"] <= result["shard_bytes"] <= 1.02 * weights / world


@pytest.mark.parametrize("world", WORLDS)
def test_training_from_it_matches_the_model_transformers_loads(launched, world):
    for rank in launched(world):
        for name, result in rank["training"].items():
            assert result["moved"], name
            assert result["identical"], name  # bit for bit, after 3 AdamW steps


@pytest.mark.parametrize("world", WORLDS)
def test_keys_the_folder_lacks_are_initialised_as_transformers_does_and_alike_on_every_rank(launched, world):
    for rank in launched(world):
        missing = rank["missing"]
        assert missing["differed_before_sharding"]  # ranks were seeded differently ...
        assert missing["rank0_values_everywhere"]  # ... and the engine gave them all rank 0's values,
        assert missing["as_transformers_initialises"]  # which are BertForSequenceClassification's own init
        assert missing["classifier_bias_max"] == 0.0
        for key in ("classifier_weight_std", "pooler_weight_std"):
            assert 0.01 < missing[key] < 0.03  # initializer_range 0.02


@pytest.mark.parametrize("world", WORLDS)
def test_dtype_and_accelerate(launched, world):
    for rank in launched(world):
        assert rank["bf16"] == {
            "loaded_dtypes": ["torch.bfloat16"],
            "saved_dtypes": ["torch.bfloat16"],
            "exact": True,
        }
        assert rank["accelerate"]["exact"]


# ---- one process ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    for name in ("llama", "gpt2", "beam"):
        build_model(name).save_pretrained(root / name)
    LlamaModel.from_pretrained(root / "llama").save_pretrained(root / "llama-base")
    return root


def _shard(model, config=STAGE3):
    return hf_zero.initialize(model, build_optimizer("adamw", list(model.named_parameters()), model), config)


def _assert_state_equal(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key


def test_below_stage_3_it_is_the_model_classes_own_from_pretrained(folders):
    model = hf_zero.from_pretrained(AutoModelForCausalLM, folders / "llama", {"stage": 2})
    assert not any(p.is_meta for p in model.parameters())
    _assert_state_equal(
        model.state_dict(), AutoModelForCausalLM.from_pretrained(folders / "llama").state_dict()
    )


def test_a_stage_3_load_trains_at_stage_2_reading_the_weights_whole(folders):
    model = hf_zero.from_pretrained(AutoModelForCausalLM, folders / "llama", STAGE3)
    engine = _shard(model, {"stage": 2})
    _assert_state_equal(
        engine.full_state_dict(), AutoModelForCausalLM.from_pretrained(folders / "llama").state_dict()
    )
    assert engine.loaded_bytes == sum(
        t.numel() * t.element_size() for t in load_file(folders / "llama" / "model.safetensors").values()
    )


def test_the_model_refuses_to_run_or_move_before_it_is_sharded(folders):
    model = hf_zero.from_pretrained(AutoModelForCausalLM, folders / "llama", STAGE3)
    batch = make_samples("llama", 2)
    with pytest.raises(RuntimeError, match=r"loaded by hf_zero.from_pretrained .* Shard it first"):
        model(**batch)
    for move in (lambda: model.to("cpu"), model.half, model.cpu):
        with pytest.raises(RuntimeError, match=r"cannot be moved or cast .* before then"):
            move()
    engine = _shard(model)
    assert torch.isfinite(engine(**batch).loss)
    model.float()  # the guards are gone once the engine holds the model


def test_a_meta_model_without_files_is_refused_by_name():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(
        ValueError, match=r"\['weight', 'bias'\] of the model are on the meta device with no values"
    ):
        _shard(model)


def test_base_model_prefix_is_added_or_removed_as_transformers_does(folders):
    # A base-model folder into a model with a head: the head is newly initialised, as transformers does.
    with pytest.warns(
        UserWarning, match=r"\['lm_head.weight'\] of LlamaForCausalLM are not in the pretrained"
    ):
        torch.manual_seed(3)
        ours = hf_zero.from_pretrained(LlamaForCausalLM, folders / "llama-base", STAGE3)
    torch.manual_seed(3)
    _assert_state_equal(
        _shard(ours).full_state_dict(), LlamaForCausalLM.from_pretrained(folders / "llama-base").state_dict()
    )
    # A folder with a head into the base model: the head's tensor is another architecture's, skipped.
    with pytest.warns(
        UserWarning, match=r"saved from LlamaForCausalLM; its tensors 'lm_head.weight' .* not loaded"
    ):
        ours = hf_zero.from_pretrained(AutoModel, folders / "llama", STAGE3)
    _assert_state_equal(
        _shard(ours).full_state_dict(), AutoModel.from_pretrained(folders / "llama").state_dict()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_stack_from_the_files_per_expert_tensors(folders, dtype):
    # Beam keeps each MoE layer's experts in one tensor; the folder, one tensor per expert. Its
    # router stays fp32 when the model loads in bf16.
    model = hf_zero.from_pretrained(AutoModelForCausalLM, folders / "beam", STAGE3, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(folders / "beam", dtype=dtype)
    assert {n: p.dtype for n, p in model.named_parameters()} == {
        n: p.dtype for n, p in reference.named_parameters()
    }
    _assert_state_equal(_shard(model).full_state_dict(), reference.state_dict())


def test_a_file_holding_both_tied_weights_ties_them_only_when_equal(folders, tmp_path):
    weights = load_file(folders / "gpt2" / "model.safetensors")
    shutil.copy(folders / "gpt2" / "config.json", tmp_path / "config.json")
    embedding = weights["transformer.wte.weight"]
    for head, tied in ((embedding.clone(), True), (embedding + 1.0, False)):
        save_file({**weights, "lm_head.weight": head}, tmp_path / "model.safetensors", {"format": "pt"})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = hf_zero.from_pretrained(GPT2LMHeadModel, tmp_path, STAGE3)
        assert any("not tied" in str(warning.message) for warning in caught) == (not tied)
        assert (model.lm_head.weight is model.transformer.wte.weight) == tied
        _assert_state_equal(
            _shard(model).full_state_dict(), GPT2LMHeadModel.from_pretrained(tmp_path).state_dict()
        )


def test_a_model_in_the_local_hub_cache_loads_without_the_network(folders, tmp_path):
    snapshot = tmp_path / "models--tiny--llama" / "snapshots" / "0123456789abcdef"
    shutil.copytree(folders / "llama", snapshot)
    (tmp_path / "models--tiny--llama" / "refs").mkdir()
    (tmp_path / "models--tiny--llama" / "refs" / "main").write_text("0123456789abcdef")
    model = hf_zero.from_pretrained(AutoModelForCausalLM, "tiny/llama", STAGE3, cache_dir=str(tmp_path))
    _assert_state_equal(_shard(model).full_state_dict(), load_pretrained_weights(folders / "llama"))


# ---- bad input gets an error naming it ------------------------------------------------------------


def test_missing_folders_files_and_models_are_named(folders, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"'/no/such/folder' is neither a folder nor a model in the local"
    ):
        hf_zero.from_pretrained(AutoModelForCausalLM, "/no/such/folder", STAGE3)
    with pytest.raises(FileNotFoundError, match=r"'someone/absent' is neither .* cache \(" + str(tmp_path)):
        hf_zero.from_pretrained(AutoModelForCausalLM, "someone/absent", STAGE3, cache_dir=str(tmp_path))
    shutil.copy(folders / "llama" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors.index.json in"):
        hf_zero.from_pretrained(AutoModelForCausalLM, tmp_path, STAGE3)
    build_model("llama").save_pretrained(tmp_path, max_shard_size="100KB")
    (tmp_path / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"names \['model-00002-of-00005.safetensors'\] but it is not in"
    ):
        hf_zero.from_pretrained(AutoModelForCausalLM, tmp_path, STAGE3)


def test_a_truncated_file_is_named(folders, tmp_path):
    shutil.copytree(folders / "llama", tmp_path, dirs_exist_ok=True)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '.*' .* damaged or truncated"):
        hf_zero.from_pretrained(AutoModelForCausalLM, tmp_path, STAGE3)


def test_a_shape_the_config_disagrees_with_is_named(folders):
    with pytest.raises(
        ValueError,
        match=r"'model.layers.0.mlp.down_proj.weight' in .* has shape \(64, 128\), but "
        r"LlamaForCausalLM.model.layers.0.mlp.down_proj.weight has shape \(64, 96\) .* ignore_mismatched_sizes=True",
    ):
        hf_zero.from_pretrained(AutoModelForCausalLM, folders / "llama", STAGE3, intermediate_size=96)
    # As in transformers, ignore_mismatched_sizes initialises those weights afresh.
    with pytest.warns(UserWarning, match="differ in shape"):
        torch.manual_seed(4)
        model = hf_zero.from_pretrained(
            AutoModelForCausalLM,
            folders / "llama",
            STAGE3,
            intermediate_size=96,
            ignore_mismatched_sizes=True,
        )
    torch.manual_seed(4)
    reference = AutoModelForCausalLM.from_pretrained(
        folders / "llama", intermediate_size=96, ignore_mismatched_sizes=True
    )
    _assert_state_equal(_shard(model).full_state_dict(), reference.state_dict())


def test_a_tensor_the_model_has_no_place_for_is_named(folders, tmp_path):
    shutil.copytree(folders / "llama", tmp_path, dirs_exist_ok=True)
    path = tmp_path / "model.safetensors"
    save_file({**load_file(path), "model.layers.0.mlp.extra.weight": torch.zeros(3)}, path, {"format": "pt"})
    with pytest.raises(
        ValueError,
        match=r"holds tensors that LlamaForCausalLM has no parameter or buffer for: "
        r"'model.layers.0.mlp.extra.weight' \(model.safetensors\)",
    ):
        hf_zero.from_pretrained(AutoModelForCausalLM, tmp_path, STAGE3)


def test_placement_options_are_refused_at_stage_3(folders):
    with pytest.raises(ValueError, match=r"does not take \['device_map'\] at ZeRO stage 3"):
        hf_zero.from_pretrained(AutoModelForCausalLM, folders / "llama", STAGE3, device_map="auto")


def _lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0, **kwargs)


def test_a_lora_model_made_from_it_trains_as_the_same_lora_model_loaded_by_transformers(folders):
    from peft import get_peft_model

    # get_peft_model builds the adapters beside the base weights, on the meta device: the engine
    # initialises them as PEFT does (A random, B zero) before sharding.
    model = get_peft_model(hf_zero.from_pretrained(AutoModelForCausalLM, folders / "gpt2", STAGE3), _lora())
    torch.manual_seed(5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = hf_zero.initialize(model, torch.optim.AdamW(trainable, lr=1e-2), STAGE3)
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(folders / "gpt2"), _lora())
    torch.manual_seed(5)  # draw A in the same order, from the same seed
    for module in reference.modules():
        if hasattr(module, "reset_lora_parameters"):
            module.reset_lora_parameters("default", True)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    _assert_state_equal(engine.full_state_dict(), before)
    assert all(not v.any() for k, v in before.items() if "lora_B" in k)
    # On the CPU the engine's AdamW step is torch's fused one: the same arithmetic, bit for bit.
    trained = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2, fused=True)
    batch = make_samples("gpt2", 4)
    for _ in range(3):
        engine.backward(engine(**batch).loss)
        engine.step()
        reference(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = reference.state_dict()
    _assert_state_equal(engine.full_state_dict(), after)
    assert all(torch.equal(after[k], v) for k, v in before.items() if "lora_" not in k)  # base frozen
    assert any(not torch.equal(after[k], v) for k, v in before.items() if "lora_B" in k)


def test_an_adapter_initialised_from_the_base_weights_is_refused(folders):
    from peft import get_peft_model

    model = hf_zero.from_pretrained(AutoModelForCausalLM, folders / "gpt2", STAGE3)
    model = get_peft_model(model, _lora(use_dora=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(
        NotImplementedError, match=r"adapter 'default' asks for .* with DoRA, which needs the base"
    ):
        hf_zero.initialize(model, torch.optim.AdamW(trainable, lr=1e-2), STAGE3)
