"""ZeroTrainer on 2 gloo ranks (through torchrun) against the plain Trainer on one process.

The runs train on Markov-chain sequences, where the loss really falls, and the checks compare
weights as well as losses. Starting a process costs more than a run trains, so the runs share three
launches (`trainer_run many`): one process for every plain Trainer run, one 2-rank torchrun for
every 2-rank ZeroTrainer run (after the plain one: two of its runs resume plain checkpoints), and
the 1-rank run that resumes stage 2's checkpoint. Each launch runs only the runs the selected tests
use; each run is a module fixture, `(OUT_DIR, report)`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

import hf_zero
from hf_zero import ZeroTrainer
from hf_zero.checkpoint import read_manifest
from hf_zero.checkpoint.reader import SpanReader
from hf_zero.engine.optim_state import load_unsharded_optimizer_state
from hf_zero.testing.launch import torchrun
from hf_zero.testing.tiny_models import build_model, make_samples, slice_samples
from hf_zero.testing.trainer_run import LogRecorder, TensorDataset, causal_lm_samples

HALFWAY = "checkpoint-3"  # trainer_run trains 6 steps and checkpoints after 3
ADAPTER_FILE = "adapter_model.safetensors"


# The plain Trainer's runs, one process: name -> trainer_run options.
PLAIN_RUNS = {
    "plain_fp32": [],
    "plain_muon": ["--muon"],  # hf_zero's optimizer factory, `MuonWithAdamW`
    "plain_bf16": ["--precision", "bf16"],
    "plain_lora": ["--lora"],
}
# ZeroTrainer's runs on 2 ranks, one torchrun launch: name -> options, and the plain run (if any)
# whose halfway checkpoint it also resumes (`--from-plain`).
ZERO_RUNS = {
    "zero_stage1": (["--stage", "1"], None),
    # Stage 2, plus resuming (its own checkpoint, the plain Trainer's) and load_best_model_at_end.
    "zero_stage2": (["--stage", "2", "--resume"], "plain_fp32"),
    # Stage 3 (parameters sharded), plus resuming its own checkpoint and load_best_model_at_end.
    "zero_stage3": (["--stage", "3", "--resume"], None),
    # Stage 3 on the same GPT-2 loaded with hf_zero.from_pretrained: each rank reads its shard.
    "zero_stage3_from_pretrained": (["--stage", "3", "--from-pretrained"], None),
    # Stage 3 with `optimizer_cls_and_kwargs=(torch.optim.Muon, ...)`, and resuming.
    "zero_muon": (["--muon", "--stage", "3", "--resume-same"], None),
    "zero_bf16": (["--stage", "2", "--precision", "bf16"], None),
    "zero_lora": (["--stage", "2", "--lora", "--resume"], "plain_lora"),
}


def _launch_many(kind: str, jobs: dict[str, list[str]], folder: Path) -> dict[str, tuple[Path, dict]]:
    """Run `jobs` (name -> trainer_run command line) one after another in one launch: a plain
    process, or `kind` "zero" on 2 torchrun ranks; each job's (OUT_DIR, report) by name."""
    if not jobs:
        return {}
    jobs_file = folder / f"{kind}_jobs.json"
    jobs_file.write_text(json.dumps(list(jobs.values())))
    # A wide margin: on this 2-core machine, loaded, the 7 two-rank jobs took 60-100 s together.
    timeout = 300 + 120 * len(jobs)
    if kind == "plain":
        command = [sys.executable, "-m", "hf_zero.testing.trainer_run", "many", str(jobs_file)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed with exit code {result.returncode}\n"
                f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-12000:]}"
            )
    else:
        torchrun("hf_zero.testing.trainer_run", 2, ["many", str(jobs_file)], timeout=timeout)
    return {name: _report(Path(line[1])) for name, line in jobs.items()}


def _report(out: Path) -> tuple[Path, dict]:
    return out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def runs_in_use(request) -> set[str]:
    """The runs the selected tests of this file use: as fixtures, or named by a parameter (for
    `request.getfixturevalue`), and the plain runs whose checkpoints those resume."""
    names = set()
    for item in request.session.items:
        if item.path == request.path:
            names.update(item.fixturenames)
            if hasattr(item, "callspec"):
                names.update(value for value in item.callspec.params.values() if isinstance(value, str))
    names.update(ZERO_RUNS[name][1] for name in names & ZERO_RUNS.keys() if ZERO_RUNS[name][1])
    return names


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory, runs_in_use) -> dict[str, tuple[Path, dict]]:
    """The plain Trainer's runs the selected tests use, in one process."""
    jobs = {
        name: ["plain", str(tmp_path_factory.mktemp(name)), *options]
        for name, options in PLAIN_RUNS.items()
        if name in runs_in_use
    }
    return _launch_many("plain", jobs, tmp_path_factory.mktemp("plain_launch"))


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, runs_in_use, plain_runs) -> dict[str, tuple[Path, dict]]:
    """ZeroTrainer's 2-rank runs the selected tests use, in one torchrun launch."""
    jobs = {}
    for name, (options, from_plain) in ZERO_RUNS.items():
        if name in runs_in_use:
            resumes = ["--from-plain", str(plain_runs[from_plain][0] / "run" / HALFWAY)] if from_plain else []
            jobs[name] = ["zero", str(tmp_path_factory.mktemp(name)), *options, *resumes]
    return _launch_many("zero", jobs, tmp_path_factory.mktemp("zero_launch"))


def _run(launch: str, name: str):
    """The module fixture `name`: that run's (OUT_DIR, report) from the launch fixture `launch`."""

    @pytest.fixture(scope="module", name=name)
    def run(request) -> tuple[Path, dict]:
        runs = request.getfixturevalue(launch)
        if name not in runs:
            raise LookupError(f"run {name} was not launched: name it as a fixture or a parameter value")
        return runs[name]

    return run


plain_fp32 = _run("plain_runs", "plain_fp32")
plain_muon = _run("plain_runs", "plain_muon")
plain_bf16 = _run("plain_runs", "plain_bf16")
plain_lora = _run("plain_runs", "plain_lora")
zero_stage1 = _run("zero_runs", "zero_stage1")
zero_stage2 = _run("zero_runs", "zero_stage2")
zero_stage3 = _run("zero_runs", "zero_stage3")
zero_stage3_from_pretrained = _run("zero_runs", "zero_stage3_from_pretrained")
zero_muon = _run("zero_runs", "zero_muon")
zero_bf16 = _run("zero_runs", "zero_bf16")
zero_lora = _run("zero_runs", "zero_lora")


def _assert_same_tensors(actual: dict, expected: dict, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == torch.float32, key
        torch.testing.assert_close(actual[key], value, rtol=0, atol=atol, msg=key)


def _assert_curves_close(actual: dict, expected: dict, rtol: float = 1e-5) -> None:
    for key in ("losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(actual[key]), torch.tensor(expected[key]), rtol=rtol, atol=0)
    assert actual["learning_rates"] == expected["learning_rates"]


def _assert_training_worked(report: dict) -> None:
    # From ~ln(256) on held-out sequences of the chain (5.57; full model 5.32 and LoRA 5.46 after
    # 6 steps): an optimizer that never stepped stays there.
    assert report["final_eval_loss"] < report["initial_eval_loss"] - 0.05
    assert report["losses"][-1] < report["losses"][0]


# ---- full model, fp32 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero_one_process_from_two(tmp_path_factory, zero_stage2):
    """One process at stage 1 resuming stage 2's 2-process checkpoint (its own 1-rank launch)."""
    out = tmp_path_factory.mktemp("zero_one_process")
    checkpoint = zero_stage2[0] / "run" / HALFWAY
    torchrun(
        "hf_zero.testing.trainer_run",
        1,
        ["zero", str(out), "--stage", "1", "--resume-elsewhere", str(checkpoint)],
    )
    return _report(out)


@pytest.mark.parametrize("run", ["zero_stage1", "zero_stage2", "zero_stage3"])
def test_zero_trainer_matches_plain_trainer(request, plain_fp32, run):
    plain_dir, plain = plain_fp32
    zero_dir, zero = request.getfixturevalue(run)
    _assert_training_worked(plain)
    _assert_curves_close(zero, plain)
    assert zero["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    assert zero["prediction_shape"] == plain["prediction_shape"]

    # save_model wrote a normal save_pretrained folder of fp32 weights that from_pretrained loads.
    saved = load_file(zero_dir / "final" / "model.safetensors")
    _assert_same_tensors(saved, load_file(plain_dir / "final" / "model.safetensors"), atol=5e-5)
    model = AutoModelForCausalLM.from_pretrained(zero_dir / "final")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # ...with a model card filled from the run (the plain Trainer writes none without the Hub).
    card = (zero_dir / "final" / "README.md").read_text()
    stage = run.removeprefix("zero_stage")
    assert f"- ZeRO stage {stage}" in card and "- processes: 2" in card and "$" not in card
    assert f"- optimizer steps: {zero['global_step']}" in card and "| eval_loss |" in card
    assert not (plain_dir / "final" / "README.md").exists()


def test_zero_trainer_trains_a_model_from_hf_zero_from_pretrained(zero_stage3, zero_stage3_from_pretrained):
    built_dir, built = zero_stage3
    loaded_dir, loaded = zero_stage3_from_pretrained
    # The folder holds the very GPT-2 the other stage-3 run builds: the runs are bit-identical.
    _assert_training_worked(loaded)
    for key in ("losses", "grad_norms", "learning_rates", "eval_loss"):
        assert loaded[key] == built[key], key
    final = load_file(loaded_dir / "final" / "model.safetensors")
    _assert_same_tensors(final, load_file(built_dir / "final" / "model.safetensors"), atol=0)


@pytest.mark.parametrize("run", ["zero_stage2", "zero_stage3"])
def test_zero_trainer_resumes_its_own_checkpoint(request, run):
    out, zero = request.getfixturevalue(run)
    # One optimizer shard per rank: the second half replays the uninterrupted run exactly.
    assert zero["resumed"]["losses"] == zero["losses"][3:]
    assert zero["resumed"]["learning_rates"] == zero["learning_rates"][3:]
    resumed = load_file(out / "resumed" / "model.safetensors")
    _assert_same_tensors(resumed, load_file(out / "final" / "model.safetensors"), atol=0)


def test_zero_trainer_resumes_its_checkpoint_at_another_stage(zero_stage2, zero_stage3):
    # Stage 2's checkpoint resumed at stage 3 continues stage 3's own run, and stage 3's at stage 1
    # continues stage 2's (stages 1 and 2 compute alike), to fp32 reduction-order rounding.
    for (out, resumed), (_, other) in ((zero_stage2, zero_stage3), (zero_stage3, zero_stage2)):
        curve = resumed["resumed_at_other_stage"]
        _assert_curves_close(curve, {key: other[key][3:] for key in curve})
        weights = load_file(out / "resumed_at_other_stage" / "model.safetensors")
        _assert_same_tensors(weights, load_file(out / "final" / "model.safetensors"), atol=5e-5)
    checkpoint = zero_stage2[0] / "run" / "checkpoint-3"
    # The Trainer's own files and the hf_zero checkpoint; no full weights, no pickled shards.
    assert {p.name for p in checkpoint.iterdir()} >= {
        "trainer_state.json",
        "scheduler.pt",
        "hf_zero_checkpoint",
    }
    assert not list(checkpoint.glob("*.safetensors")) and not list(checkpoint.glob("hf_zero_shard*"))


def test_zero_trainer_resumes_a_two_process_checkpoint_on_one_process(zero_stage2, zero_one_process_from_two):
    out, zero = zero_stage2
    one_dir, one = zero_one_process_from_two
    # Same global batch, data order and schedule: the stage-2 run's second half, to rounding.
    curve = one["resumed_elsewhere"]
    _assert_curves_close(curve, {key: zero[key][3:] for key in curve})
    weights = load_file(one_dir / "resumed_elsewhere" / "model.safetensors")
    _assert_same_tensors(weights, load_file(out / "final" / "model.safetensors"), atol=5e-5)


def test_zero_trainer_resumes_a_plain_trainer_checkpoint(plain_fp32, zero_stage2):
    plain_dir, plain = plain_fp32
    out, zero = zero_stage2
    # The plain Trainer's optimizer.pt (resharded over 2 ranks) and scheduler.pt both load: the
    # second half continues the plain run's schedule (no fresh warmup) and Adam moments.
    _assert_curves_close(zero["from_plain"], {key: plain[key][3:] for key in zero["from_plain"]})
    resumed = load_file(out / "from_plain" / "model.safetensors")
    _assert_same_tensors(resumed, load_file(plain_dir / "final" / "model.safetensors"), atol=5e-5)


def test_resuming_a_checkpoint_without_optimizer_state_is_refused(zero_stage2):
    _, zero = zero_stage2
    message = zero["weights_only_resume_error"]
    assert "holds no optimizer state" in message
    assert "hf_zero_checkpoint/" in message and "optimizer.pt" in message
    assert "without resume_from_checkpoint" in message


@pytest.mark.parametrize("run", ["zero_stage2", "zero_stage3"])
def test_load_best_model_at_end_restores_the_best_checkpoint(request, run):
    out, _ = request.getfixturevalue(run)
    # The eval loss falls, and "greater is better" made checkpoint-3 the best: the weights after
    # training are that checkpoint's (masters included, so the saved fp32 weights equal it).
    best = load_file(out / "best_final" / "model.safetensors")
    last = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(best[key], last[key]) for key in last)
    _assert_same_tensors(best, _checkpoint_weights(out / "best" / HALFWAY / "hf_zero_checkpoint"), atol=0)


def _checkpoint_weights(folder) -> dict[str, torch.Tensor]:
    """Every weight an hf_zero checkpoint holds, read whole from its rank files (tied ones once)."""
    manifest = read_manifest(folder)
    reader = SpanReader(folder, manifest)
    try:
        return {
            record["name"]: reader.read_whole(record).to(getattr(torch, record["dtype"]))
            for record in manifest["tensors"]
            if record["kind"] != "buffer"
        }
    finally:
        reader.close()


# ---- Muon for the hidden matrices, AdamW for the rest ----------------------------------------------


def test_zero_trainer_with_muon_tracks_the_plain_trainer(plain_muon, zero_muon):
    (plain_dir, plain), (zero_dir, zero) = plain_muon, zero_muon
    _assert_training_worked(zero)
    # Newton–Schulz runs in bf16, where AdamW's last bits (fused kernels against torch's) flip
    # roundings: measured 3e-6 on the losses, 1e-4 on the norms and 5e-4 on the weights (2026-12-06).
    torch.testing.assert_close(torch.tensor(zero["losses"]), torch.tensor(plain["losses"]), rtol=1e-4, atol=0)
    torch.testing.assert_close(
        torch.tensor(zero["grad_norms"]), torch.tensor(plain["grad_norms"]), rtol=1e-3, atol=0
    )
    assert zero["learning_rates"] == plain["learning_rates"]
    saved = load_file(zero_dir / "final" / "model.safetensors")
    _assert_same_tensors(saved, load_file(plain_dir / "final" / "model.safetensors"), atol=3e-3)
    # The checkpoint holds Muon's momentum: the second half replays the uninterrupted run exactly.
    assert zero["resumed"]["losses"] == zero["losses"][3:]
    resumed = load_file(zero_dir / "resumed" / "model.safetensors")
    _assert_same_tensors(resumed, saved, atol=0)


# ---- full model, bf16 -----------------------------------------------------------------------------


def test_zero_trainer_bf16_tracks_plain_trainer(plain_bf16, zero_bf16):
    (plain_dir, plain), (zero_dir, zero) = plain_bf16, zero_bf16
    _assert_training_worked(zero)
    # The plain Trainer autocasts fp32 weights; hf_zero computes on bf16 weights with fp32 masters.
    _assert_curves_close(zero, plain, rtol=5e-3)
    assert zero["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-3)
    # Both took the same steps: the weights moved by the same amounts, up to bf16 rounding (a few
    # percent of the update; an optimizer that did not step would be 100% off).
    initial = build_model("gpt2").state_dict()
    zero_weights = load_file(zero_dir / "final" / "model.safetensors")
    plain_weights = load_file(plain_dir / "final" / "model.safetensors")
    error = norm = 0.0
    for key, value in plain_weights.items():
        assert zero_weights[key].dtype == torch.float32, key
        error += (zero_weights[key] - value).square().sum().item()
        norm += (value - initial[key]).square().sum().item()
    assert (error / norm) ** 0.5 < 0.1
    # The folder says what it holds: from_pretrained's default gives back the fp32 masters.
    reloaded = AutoModelForCausalLM.from_pretrained(zero_dir / "final")
    assert reloaded.transformer.h[0].mlp.c_fc.weight.dtype == torch.float32


# ---- PEFT (LoRA), fp32 ------------------------------------------------------------------------------


def test_zero_trainer_trains_and_saves_a_lora_adapter(plain_lora, zero_lora):
    plain_dir, plain = plain_lora
    out, zero = zero_lora
    _assert_training_worked(zero)
    _assert_curves_close(zero, plain)

    # The save is PEFT's adapter folder holding the fp32 masters of the adapter weights, and only
    # those were copied for it: the frozen base was neither gathered nor copied.
    assert not (out / "final" / "model.safetensors").exists()
    adapter = load_file(out / "final" / ADAPTER_FILE)
    _assert_same_tensors(adapter, load_file(plain_dir / "final" / ADAPTER_FILE), atol=5e-5)
    assert zero["copied_for_save"] == sorted(
        key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.") for key in adapter
    )
    card = (out / "final" / "README.md").read_text()
    assert "library_name: peft" in card and "AutoPeftModel.from_pretrained" in card
    model = PeftModel.from_pretrained(build_model("gpt2"), out / "final")
    loaded = {name: param for name, param in model.named_parameters() if "lora_" in name}
    assert len(loaded) == len(adapter)
    for key, value in adapter.items():
        torch.testing.assert_close(loaded[key.replace(".weight", ".default.weight")], value, rtol=0, atol=0)


def test_zero_trainer_resumes_a_lora_adapter_checkpoint(plain_lora, zero_lora):
    plain_dir, plain = plain_lora
    out, zero = zero_lora
    final = load_file(out / "final" / ADAPTER_FILE)
    assert zero["resumed"]["losses"] == zero["losses"][3:]
    _assert_same_tensors(load_file(out / "resumed" / ADAPTER_FILE), final, atol=0)
    # From the plain Trainer's adapter checkpoint (adapter weights + optimizer.pt over the adapter).
    _assert_curves_close(zero["from_plain"], {key: plain[key][3:] for key in zero["from_plain"]})
    _assert_same_tensors(
        load_file(out / "from_plain" / ADAPTER_FILE), load_file(plain_dir / "final" / ADAPTER_FILE), atol=5e-5
    )


def test_load_best_model_at_end_restores_the_best_lora_adapter(zero_lora):
    out, _ = zero_lora
    best = load_file(out / "best_final" / ADAPTER_FILE)
    last = load_file(out / "final" / ADAPTER_FILE)
    assert any(not torch.equal(best[key], last[key]) for key in last)
    _assert_same_tensors(best, load_file(out / "best" / HALFWAY / ADAPTER_FILE), atol=0)


# ---- unsharded optimizer state, one process ----------------------------------------------------------


def _frozen_wpe_groups(model):
    """Two param groups with a frozen tensor inside the first, as a user may build them."""
    model.transformer.wpe.weight.requires_grad_(False)
    params = dict(model.named_parameters())
    decay = [p for n, p in params.items() if n.endswith("weight") and "ln_" not in n]
    return [{"params": decay}, {"params": [p for p in params.values() if all(p is not q for q in decay)]}]


def _adamw(model):
    groups = _frozen_wpe_groups(model)
    return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)


def _step(model, optimizer, batch):
    optimizer.zero_grad()
    model(**batch).loss.backward()
    optimizer.step()


def test_unsharded_optimizer_state_resumes_training_exactly():
    """Positions count across groups and include frozen tensors; the saved lr wins, as in torch."""
    samples = make_samples("gpt2", 12)
    plain = build_model("gpt2")
    optimizer = _adamw(plain)
    for step in range(2):
        _step(plain, optimizer, slice_samples(samples, 4 * step, 4))
    saved = optimizer.state_dict()
    resumed = build_model("gpt2", seed=1)
    resumed.load_state_dict(plain.state_dict())
    resumed_optimizer = _adamw(resumed)
    resumed_optimizer.param_groups[0]["lr"] = 0.5  # replaced by the saved value
    engine = hf_zero.initialize(resumed, resumed_optimizer, {"stage": 2, "precision": "fp32"})
    load_unsharded_optimizer_state(engine, saved)
    assert [group["lr"] for group in engine.optimizer.param_groups] == [1e-3, 1e-3]

    _step(plain, optimizer, slice_samples(samples, 8, 4))
    engine.backward(engine(**slice_samples(samples, 8, 4)).loss)
    engine.step()
    expected = plain.state_dict()
    for key, value in engine.full_state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)


def _saved_adamw_state() -> dict:
    model = build_model("gpt2")
    optimizer = _adamw(model)
    _step(model, optimizer, make_samples("gpt2", 4))
    return optimizer.state_dict()


def _drop_last_group(state):
    state["param_groups"].pop()


def _shrink_first_group(state):
    state["param_groups"][0]["params"].pop()


def _as_sgd(state):
    for group in state["param_groups"]:
        del group["betas"], group["eps"]
        group["momentum"] = 0.9


def _forget_one_param(state):
    first_trained = next(iter(state["state"]))
    del state["state"][first_trained]


def _wrong_shape(state):
    entry = next(iter(state["state"].values()))
    entry["exp_avg"] = entry["exp_avg"][:1]


def _rename(state):
    group = state["param_groups"][0]
    group["param_names"] = [f"other.{i}" for i in range(len(group["params"]))]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_drop_last_group, r"holds 1 param group\(s\) of sizes \[\d+\], but the optimizer was built with 2"),
        (_shrink_first_group, r"of sizes \[\d+, \d+\], but .* different grouping of its parameters"),
        (_as_sgd, r"has no \['betas', 'eps'\].*different kind of optimizer"),
        (_forget_one_param, r"holds nothing for \['transformer.wte.weight'\] in param group 0"),
        (_wrong_shape, r"'exp_avg' for parameter \S+ has shape \(1, \d+\) but the parameter has shape"),
        (_rename, r"names its parameters differently .* saved 'other.0', model 'transformer.wte.weight'"),
    ],
)
def test_unsharded_optimizer_state_that_does_not_fit_is_refused(corrupt, message):
    state = _saved_adamw_state()
    corrupt(state)
    model = build_model("gpt2")
    engine = hf_zero.initialize(model, _adamw(model), {"stage": 2})
    with pytest.raises(ValueError, match=message):
        load_unsharded_optimizer_state(engine, state)
    assert not engine.optimizer.state  # nothing was loaded


# ---- construction-time checks ----------------------------------------------------------------------


def _args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


def test_config_that_contradicts_training_arguments_is_refused(tmp_path):
    model = build_model("gpt2")
    with pytest.raises(
        ValueError, match=r"gradient_clipping=0\.3 disagrees with TrainingArguments\.max_grad_norm"
    ):
        ZeroTrainer(
            model=model, args=_args(tmp_path, max_grad_norm=1.0), zero_config={"gradient_clipping": 0.3}
        )
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 disagrees"):
        ZeroTrainer(
            model=model,
            args=_args(tmp_path, gradient_accumulation_steps=2),
            zero_config={"gradient_accumulation_steps": 4},
        )
    with pytest.raises(ValueError, match="unknown ZeroConfig field 'stagee'; did you mean 'stage'"):
        ZeroTrainer(model=model, args=_args(tmp_path), zero_config={"stagee": 2})


@pytest.mark.parametrize(
    ("training_args", "zero_config", "message"),
    [
        (
            {},
            {
                "offload_params": "nvme",
                "offload_optimizer": "cpu",
                "nvme_path": "/no/such/folder",
                "stage": 3,
            },
            "nvme_path='/no/such/folder' is not an existing folder",
        ),
    ],
)
def test_configs_that_cannot_run_here_are_refused_when_the_trainer_is_built(
    tmp_path, training_args, zero_config, message
):
    with pytest.raises(FileNotFoundError, match=message):
        ZeroTrainer(model=build_model("gpt2"), args=_args(tmp_path, **training_args), zero_config=zero_config)


# ---- fp16 ------------------------------------------------------------------------------------------


class _OverflowOnThirdStep(ZeroTrainer):
    """Makes the gradient of the third optimizer step overflow (an inf in the loss)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        result = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training and self.state.global_step == 2:
            if isinstance(result, tuple):
                return (result[0] * float("inf"), *result[1:])
            return result * float("inf")
        return result


def test_zero_trainer_fp16_skips_an_overflowing_step_without_advancing_the_schedule(tmp_path):
    steps = 6
    args = _args(
        tmp_path,
        fp16=True,
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    recorder = LogRecorder()
    trainer = _OverflowOnThirdStep(
        model=build_model("gpt2"),
        args=args,
        train_dataset=TensorDataset(causal_lm_samples(2 * steps)),
        callbacks=[recorder],
        zero_config={"stage": 2},
    )
    trainer.train()
    logs = recorder.logs
    assert [log["skipped_steps"] for log in logs] == [0, 0, 1, 1, 1, 1]
    assert all(log["loss_scale"] == 65536.0 for log in logs)  # hysteresis 2: one overflow keeps it
    rates = [log["learning_rate"] for log in logs]
    # Linear decay: every taken step lowers the rate; the skipped one leaves it where it was.
    assert rates[0] > rates[1] > rates[2] == rates[3] > rates[4] > rates[5]
    assert trainer.lr_scheduler.last_epoch == steps - 1  # five taken steps, one skipped
    assert trainer.zero_engine.skipped_steps == 1 and trainer.zero_engine.compute_dtype == torch.float16
