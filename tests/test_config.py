"""ZeroConfig: validation, file formats and DeepSpeed translation."""

from __future__ import annotations

import json
import warnings

import pytest

from hf_zero import ZeroConfig


def test_defaults_are_valid_and_round_trip():
    config = ZeroConfig()
    assert config.stage == 2 and config.precision == "auto" and config.loss_scale == 0.0
    assert ZeroConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("stage", 4, "an integer from 0 to 3"),
        ("stage", "two", "an integer from 0 to 3"),
        ("stage", True, "an integer from 0 to 3"),
        ("precision", "fp8", "one of 'auto', 'fp32', 'bf16', 'fp16'"),
        ("offload_optimizer", "gpu", "one of 'none', 'cpu', 'nvme'"),
        ("offload_params", "disk", "one of 'none', 'cpu', 'nvme'"),
        ("nvme_path", 3, "a folder path"),
        ("loss_scale", -1.0, "a number >= 0"),
        ("initial_scale_power", 65, "an integer from 0 to 64"),
        ("loss_scale_window", 0, "an integer >= 1"),
        ("hysteresis", 0, "an integer >= 1"),
        ("min_loss_scale", 0.0, "a number > 0"),
        ("reduce_bucket_size", 0, "an integer >= 1"),
        ("reduce_bucket_size", 2.5, "an integer >= 1"),
        ("reduce_dtype", "bf16", "one of 'auto', 'fp32'"),
        ("overlap_comm", "yes", "true or false"),
        ("gradient_clipping", -0.5, "a number >= 0"),
        ("gradient_clipping", float("nan"), "a number >= 0"),
        ("gradient_accumulation_steps", 0, "an integer >= 1"),
        ("allow_untested_optimizer", 1, "true or false"),
    ],
)
def test_bad_value_names_field_value_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError) as error:
        ZeroConfig.from_dict({field: value})
    message = str(error.value)
    assert f"ZeroConfig.{field}={value!r} is not allowed" in message
    assert allowed in message


def test_unknown_key_names_the_closest_field():
    with pytest.raises(
        ValueError, match="unknown ZeroConfig field 'reduce_bucket_sise'; did you mean 'reduce_bucket_size'"
    ):
        ZeroConfig.from_dict({"reduce_bucket_sise": 10})
    with pytest.raises(
        ValueError, match="unknown ZeroConfig field 'zzz'; valid fields: allow_untested_optimizer"
    ):
        ZeroConfig.from_dict({"zzz": 1})


def test_combinations_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="offload_params='cpu' is not allowed with stage=2"):
        ZeroConfig(stage=2, offload_params="cpu")
    with pytest.raises(ValueError, match="nvme_path=None is not allowed when offloading to 'nvme'"):
        ZeroConfig(offload_optimizer="nvme")
    with pytest.raises(ValueError, match="offload_params='cpu' is not allowed with offload_optimizer='none'"):
        ZeroConfig(stage=3, offload_params="cpu")
    both = ZeroConfig(stage=3, offload_params="nvme", offload_optimizer="cpu", nvme_path="/tmp/x")
    assert both.offload_params == "nvme"


def test_precision_aliases_and_numeric_text():
    assert ZeroConfig.from_dict({"precision": "bfloat16"}).precision == "bf16"
    assert ZeroConfig.from_dict({"precision": "FP16"}).precision == "fp16"
    assert ZeroConfig.from_dict({"reduce_dtype": "float32"}).reduce_dtype == "fp32"
    # YAML reads 5e7 as a string.
    assert ZeroConfig.from_dict({"reduce_bucket_size": "5e7"}).reduce_bucket_size == 50_000_000
    assert ZeroConfig.from_dict({"gradient_clipping": "1.5"}).gradient_clipping == 1.5


def test_from_file_reads_yaml_and_json(tmp_path):
    (tmp_path / "z.yaml").write_text("stage: 1\nprecision: bf16\nreduce_bucket_size: 5e7\n")
    (tmp_path / "z.json").write_text(json.dumps({"stage": 0, "gradient_clipping": 1.0}))
    assert ZeroConfig.from_file(tmp_path / "z.yaml") == ZeroConfig(
        stage=1, precision="bf16", reduce_bucket_size=50_000_000
    )
    assert ZeroConfig.from_file(tmp_path / "z.json") == ZeroConfig(stage=0, gradient_clipping=1.0)
    assert ZeroConfig.coerce(str(tmp_path / "z.json")).stage == 0


def test_from_file_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ZeroConfig.from_file(tmp_path / "missing.yaml")
    (tmp_path / "z.toml").write_text("stage = 1")
    with pytest.raises(ValueError, match=r"must end in \.yaml, \.yml or \.json"):
        ZeroConfig.from_file(tmp_path / "z.toml")
    (tmp_path / "bad.yaml").write_text("stage: [1\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        ZeroConfig.from_file(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a mapping at its top level"):
        ZeroConfig.from_file(tmp_path / "list.json")
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match=r"looks like a DeepSpeed config.*from_deepspeed"):
        ZeroConfig.from_file(tmp_path / "ds.json")


def test_coerce_refuses_other_types():
    with pytest.raises(ValueError, match="expected a ZeroConfig, a dict of its fields or a path"):
        ZeroConfig.coerce(42)


DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto",
    "steps_per_print": 100,
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.0,
    "zero_allow_untested_optimizer": True,
    "communication_data_type": "fp32",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    "fp16": {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 12,
        "loss_scale_window": 500,
        "hysteresis": 3,
        "min_loss_scale": 2,
        "auto_cast": False,
    },
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {
            "device": "nvme",
            "nvme_path": "/local_nvme",
            "pin_memory": True,
            "buffer_count": 5,
        },
        "offload_param": {"device": "cpu"},
        "reduce_bucket_size": 2e8,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "stage3_prefetch_bucket_size": "auto",
    },
}


def test_from_deepspeed_maps_zero_precision_scaler_clipping_and_accumulation(tmp_path):
    with pytest.warns(UserWarning) as caught:
        config = ZeroConfig.from_deepspeed(DEEPSPEED)
    assert config == ZeroConfig(
        stage=3,
        precision="fp16",
        offload_optimizer="nvme",
        offload_params="cpu",
        nvme_path="/local_nvme",
        nvme_buffer_count=5,
        loss_scale=0.0,
        initial_scale_power=12,
        loss_scale_window=500,
        hysteresis=3,
        min_loss_scale=2.0,
        reduce_bucket_size=200_000_000,
        reduce_dtype="fp32",
        overlap_comm=False,
        gradient_clipping=1.0,
        gradient_accumulation_steps=4,
        allow_untested_optimizer=True,
    )
    # One report, a short line per block of keys not used ("auto" ones ask for a default: not listed).
    assert len(caught) == 1
    assert str(caught[0].message).splitlines() == [
        "hf_zero does not use these parts of the DeepSpeed config:",
        "  optimizer (AdamW): your optimizer trains; ZeroTrainer checks concrete values against TrainingArguments",
        "  zero_optimization (offload_optimizer.pin_memory, contiguous_gradients): hf_zero's own settings apply",
        "  fp16.auto_cast: no hf_zero counterpart",
        "  steps_per_print: no hf_zero counterpart",
    ]
    (tmp_path / "ds.json").write_text(json.dumps(DEEPSPEED))
    with pytest.warns(UserWarning):
        assert ZeroConfig.from_deepspeed(tmp_path / "ds.json") == config


def test_from_deepspeed_reports_on_one_process_only(monkeypatch):
    # Before the process group exists, torchrun's RANK says which process reports.
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ZeroConfig.from_deepspeed(DEEPSPEED).stage == 3
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(UserWarning, match="hf_zero does not use these parts"):
        ZeroConfig.from_deepspeed(DEEPSPEED)


def test_a_concrete_learning_rate_that_is_not_what_trains_is_refused(tmp_path):
    from transformers import TrainingArguments

    from hf_zero import ZeroTrainer
    from hf_zero.testing.tiny_models import build_model

    ds = {
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}},
        "train_micro_batch_size_per_gpu": 2,
    }
    with pytest.warns(UserWarning):
        config = ZeroConfig.from_deepspeed(ds)
    assert config.deepspeed_loop_values == {
        "optimizer.params.lr": 3e-4, "optimizer.params.betas": [0.9, 0.95], "train_micro_batch_size_per_gpu": 2
    }  # fmt: skip
    assert ZeroConfig.from_dict(config.to_dict()) == config

    def args(**kwargs):
        return TrainingArguments(
            output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=2, **kwargs
        )

    model = build_model("gpt2")
    # As the Trainer does with deepspeed=: every disagreement named, and the fix.
    with pytest.raises(ValueError) as error:
        ZeroTrainer(model=model, args=args(learning_rate=5e-5), zero_config=config)
    assert str(error.value).splitlines()[1:3] == [
        "- ds optimizer.params.lr=0.0003 vs hf learning_rate=5e-05",
        "- ds optimizer.params.betas=[0.9, 0.95] vs hf adam_beta1, adam_beta2=[0.9, 0.999]",
    ]
    assert 'write "auto" in the DeepSpeed config' in str(error.value)
    trainer = ZeroTrainer(model=model, args=args(learning_rate=3e-4, adam_beta2=0.95), zero_config=config)
    assert trainer.create_optimizer().param_groups[0]["lr"] == 3e-4
    with pytest.raises(
        ValueError, match=r"optimizer.params.lr='fast' is not allowed: expected a number or \"auto\""
    ):
        ZeroConfig.from_deepspeed({"optimizer": {"params": {"lr": "fast"}}})
    with pytest.raises(
        ValueError, match=r"deepspeed_loop_values has 'optimizer.params.momentum', which is not"
    ):
        ZeroConfig.from_dict({"deepspeed_loop_values": {"optimizer.params.momentum": 0.9}})


def test_from_deepspeed_precision_and_auto_values():
    bf16 = ZeroConfig.from_deepspeed({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}})
    assert (bf16.precision, bf16.stage) == ("bf16", 1)
    auto = ZeroConfig.from_deepspeed({"bf16": {"enabled": "auto"}, "gradient_clipping": "auto"})
    assert (auto.precision, auto.gradient_clipping) == ("auto", 0.0)
    off = ZeroConfig.from_deepspeed({"fp16": {"enabled": False}, "bf16": {"enabled": False}})
    assert off.precision == "fp32"
    with pytest.raises(ValueError, match=r"'fp16.enabled' and 'bf16.enabled' are both true"):
        ZeroConfig.from_deepspeed({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    with pytest.raises(ValueError, match=r"ZeroConfig.stage=7 is not allowed"):
        ZeroConfig.from_deepspeed({"zero_optimization": {"stage": 7}})
    with pytest.raises(ValueError, match=r"'zero_optimization.offload_param' must be a mapping"):
        ZeroConfig.from_deepspeed({"zero_optimization": {"offload_param": "cpu"}})


def test_yaml_reads_no_as_text_and_exponents_as_numbers():
    from hf_zero.config.zero_config import load_yaml

    assert load_yaml("a: no\nb: on\nc: true\nd: FALSE\ne: 1e-3\nf: 5e7\ng: 2") == {
        "a": "no", "b": "on", "c": True, "d": False, "e": 1e-3, "f": 5e7, "g": 2,
    }  # fmt: skip
