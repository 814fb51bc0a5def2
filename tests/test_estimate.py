"""`hf-zero estimate` against the engine's own accounting, and the command itself.

The engine runs each case for two optimizer steps on gloo ranks (one torchrun launch of three ranks;
the two-rank cases run on a sub-group of ranks 0 and 1); each rank records its
`engine.memory_breakdown()`, `engine.last_step_comm_bytes` and the bytes the collectives really
carried (`CollectiveSpy`, counted at `torch.distributed`). The estimate, computed from the config
alone (the model built on the meta device), must match each within 5%. The launched half is
`hf_zero.testing.estimate_checks`.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_zero
from hf_zero.cli.estimate import (
    ModelShape,
    activation_bytes,
    estimate,
    estimate_all,
    estimate_command,
    model_shape,
    parse_size,
    zeropp_estimates,
)
from hf_zero.testing.estimate_checks import BATCH, CASES, SEQ, TOLERANCE, tiny_config

# ---- the estimate against the engine -----------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Per case, each rank's measurements (one torchrun launch)."""
    from hf_zero.testing.launch import torchrun

    out = tmp_path_factory.mktemp("estimate")
    torchrun("hf_zero.testing.estimate_checks", 3, [str(out)], timeout=300)
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(3)]
    return {case.name: [r[case.name] for r in ranks if case.name in r] for case in CASES}


@pytest.fixture(scope="module")
def shapes() -> dict[str, ModelShape]:
    return {name: model_shape(tiny_config(name)) for name in ("llama", "gpt2")}


def assert_close(what: str, estimated: float, measured: float) -> None:
    if measured == 0:
        assert estimated == 0, f"{what}: estimated {estimated}, measured 0"
    else:
        error = abs(estimated - measured) / measured
        assert error <= TOLERANCE, (
            f"{what}: estimated {estimated:,.0f}, measured {measured:,.0f} ({error:.1%} off)"
        )


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_estimate_matches_engine(measured, shapes, case):
    result = estimate(
        shapes[case.model],
        case.stage,
        case.offload,
        gpus=case.world,
        precision=case.precision,
        batch=BATCH,
        seq=SEQ,
        grad_accum=case.grad_accum,
        reduce_dtype=case.reduce_dtype,
        optimizer=case.optimizer,
    )
    memory = result.memory
    ranks = measured[case.name]
    assert len(ranks) == case.world
    for rank, got in enumerate(ranks):
        breakdown = got["memory"]
        assert_close(f"rank {rank} weights", memory.weights, breakdown["weights"])
        assert_close(f"rank {rank} masters", memory.masters, breakdown["masters"])
        assert_close(f"rank {rank} gradients", memory.gradients, breakdown["gradients"])
        assert_close(f"rank {rank} optimizer state", memory.optimizer_state, breakdown["optimizer_state"])
        # Offloaded: masters, optimizer state and the host staging buffers (and parameter shards).
        assert_close(f"rank {rank} host", memory.host, breakdown["offloaded"])
        assert_close(f"rank {rank} gathered", memory.gathered, breakdown["peak_gathered"])
        if case.stage != 3:
            # At stage 3 on gloo the engine never waits for a reduce-scatter mid-backward (a blocked
            # rank could hold up a gather its peer waits on), so every bucket is staged until the end
            # of the pass; the estimate is for NCCL, where at most two are in flight.
            assert_close(f"rank {rank} staging", memory.staging, breakdown["peak_staging"])
        if case.optimizer == "muon":
            continue  # (below: each rank's share of Muon's all-to-alls follows the matrices it owns)
        for step, (comm, spied) in enumerate(zip(got["comm"], got["spied"], strict=True)):
            assert_close(f"rank {rank} step {step} comm", result.comm.total_bytes, comm)
            assert_close(f"rank {rank} step {step} collectives", result.comm.total_bytes, spied)
    if case.optimizer == "muon":  # the estimate is the mean over ranks
        for step in range(len(ranks[0]["comm"])):
            for key in ("comm", "spied"):
                mean = sum(got[key][step] for got in ranks) / len(ranks)
                assert_close(f"mean step {step} {key}", result.comm.total_bytes, mean)


# ---- activations -----------------------------------------------------------------------------------


def saved_for_backward(model: torch.nn.Module, batch: int, seq: int) -> int:
    """Bytes autograd saves in one forward with a loss, the model's own weights excepted."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(input_ids=ids, labels=ids)
    # The logits stay alive in the output the caller holds.
    return sum(saved.values()) + output.logits.untyped_storage().nbytes()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_activation_estimate_matches_what_autograd_saves(precision):
    config = LlamaConfig(
        hidden_size=192,
        intermediate_size=448,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=1500,
        max_position_embeddings=256,
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
    got = saved_for_backward(model, 2, 96)
    want = activation_bytes(model_shape(config), 2, 96, precision)
    assert abs(want - got) <= 0.1 * got, (want, got)


# ---- the pure function -----------------------------------------------------------------------------


def test_estimates_follow_the_stages(shapes):
    shape = shapes["llama"]
    rows = estimate_all(shape, gpus=8, nodes=2)
    assert [(e.stage, e.offload) for e in rows] == [
        (0, "none"), (0, "optimizer"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"),
        (3, "none"), (3, "optimizer"), (3, "optimizer+params"),
    ]  # fmt: skip
    states = {(e.stage, e.offload): e.memory.model_states for e in rows}
    # Each stage shards one more kind of state; offload takes masters and optimizer state off the GPU.
    assert states[0, "none"] > states[1, "none"] > states[2, "none"] > states[3, "none"]
    assert states[3, "optimizer+params"] < states[3, "optimizer"] < states[3, "none"]
    # A ring all-reduce costs a reduce-scatter plus an all-gather: stages 0-2 communicate alike.
    assert rows[0].comm.total_bytes == rows[2].comm.total_bytes == rows[4].comm.total_bytes
    assert rows[6].comm.total_bytes > rows[4].comm.total_bytes
    # Two nodes: the 100 Gb/s network bounds the step.
    assert rows[0].comm.seconds == rows[0].comm.inter_seconds > rows[0].comm.intra_seconds
    with pytest.raises(ValueError, match="only at stage 3"):
        estimate(shape, 2, "optimizer+params")
    with pytest.raises(ValueError, match="precision"):
        estimate(shape, 2, precision="fp8")


def test_tied_weights_are_counted_once(shapes):
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    assert shapes["gpt2"].parameters == sum(p.numel() for p in model.parameters())
    assert shapes["gpt2"].parameters < sum(
        p.numel() for _, p in model.named_parameters(remove_duplicate=False)
    )


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("512 mb") == 512 * 10**6
    assert parse_size("24") == 24 * 10**9
    for bad in ("80XB", "GB", "-3GB", ""):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)


# ---- the command -----------------------------------------------------------------------------------


@pytest.fixture
def config_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_config("llama").save_pretrained(folder)
    return folder


def table_rows(text: str, table: str) -> dict[tuple[str, ...], list[str]]:
    """The rows of the "memory" table by (stage, offload), or of the "communication" table by stage;
    cells are separated by at least two spaces."""
    memory, communication = text.split("\nCommunication")
    rows = {}
    for line in (memory if table == "memory" else communication).splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0].isdigit():
            key = tuple(cells[:2]) if table == "memory" else (cells[0],)
            rows[key] = cells[len(key) :]
    return rows


def test_command_prints_every_stage_and_what_fits(config_dir, capsys, tmp_path):
    assert estimate_command([str(config_dir), "--gpus", "2", "--batch", "2", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, "memory")
    assert set(rows) == {
        ("0", "none"), ("0", "opt->cpu"), ("1", "none"), ("1", "opt->cpu"), ("2", "none"), ("2", "opt->cpu"),
        ("3", "none"), ("3", "opt->cpu"), ("3", "opt+params->cpu"),
    }  # fmt: skip
    assert all(cells[7] == "yes" for cells in rows.values())  # a few MiB fit in 80GB
    assert "LlamaForCausalLM: 1,115,264 parameters" in out
    assert set(table_rows(out, "communication")) == {("0",), ("1",), ("2",), ("3",)}
    # The snapshot of asynchronous checkpoints: what an engine's asynchronous save really holds.
    config = tiny_config("llama")
    model = AutoModelForCausalLM.from_config(config)
    engine = hf_zero.initialize(model, torch.optim.AdamW(model.parameters()), {"stage": 1})
    ids = torch.randint(0, config.vocab_size, (1, 8))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(tmp_path / "checkpoint", asynchronous=True)
    engine.wait_for_checkpoint()
    held = engine.background_saves.snapshot.nbytes  # one rank holding all of it
    engine.close()
    assert f"checkpoint part, {held / 2 / 2**20:.2f} MiB per GPU at stages 1-3" in out

    # A GPU between stage 3's total and stage 0's: the early stages no longer fit, stage 3 does.
    totals = {
        (e.stage, e.offload): e.memory.device_total
        for e in estimate_all(model_shape(tiny_config("llama")), gpus=2, batch=2, seq=64)
    }
    budget = (totals[3, "none"] + totals[0, "none"]) // 2
    argv = [str(config_dir / "config.json"), "--gpus", "2", "--batch", "2", "--seq", "64"]
    assert estimate_command([*argv, "--gpu-memory", f"{budget}B"]) == 0
    rows = table_rows(capsys.readouterr().out, "memory")
    assert rows["0", "none"][7] == "no"
    assert rows["3", "none"][7] in ("yes", "tight")


def test_command_with_muon_shows_its_matrices_balance_and_exchange(config_dir, capsys, tmp_path):
    assert estimate_command([str(config_dir), "--gpus", "3", "--optimizer", "muon"]) == 0
    out = capsys.readouterr().out
    shape = model_shape(tiny_config("llama"))
    assert f"Muon: {len(shape.muon_shapes)} hidden matrices, {shape.muon_parameters:,} parameters" in out
    assert "Muon + AdamW" in out and "x the mean" in out
    # No offload rows (Muon runs on the GPU), and its all-to-alls in a column of their own.
    assert set(table_rows(out, "memory")) == {("0", "none"), ("1", "none"), ("2", "none"), ("3", "none")}
    communication = table_rows(out, "communication")
    assert float(communication[("0",)][3]) == 0 and float(communication[("2",)][3]) > 0
    # One momentum per matrix element instead of AdamW's two.
    adamw, muon = (
        estimate(shape, 2, gpus=3, optimizer=kind).memory.optimizer_state for kind in ("adamw", "muon")
    )
    assert adamw - muon == 4 * shape.muon_parameters // 3
    with pytest.raises(ValueError, match="no optimizer offload"):
        estimate(shape, 2, "optimizer", gpus=3, optimizer="muon")


def test_zeropp_rows_cut_what_crosses_nodes(shapes):
    shape = shapes["llama"]
    rows = {row.label: row for row in zeropp_estimates(shape, gpus=8, nodes=4, block=256)}
    P, R = shape.parameters, shape.root_parameters
    E, f = shape.input_embedding, 31 / 32
    none = rows["none"]
    assert none.forward_gather == round(2 * P * f)
    assert none.backward_gather == round(2 * (P - R - E) * f)
    assert none.reduce == round(2 * P * f)
    assert none.node_network == pytest.approx(none.total_bytes, abs=2)  # every collective spans the nodes
    # qwZ: int8 plus a 4-byte scale per 256 for all but the root.
    assert rows["qwZ"].forward_gather == round((2 * R + (1 + 4 / 256) * (P - R)) * f)
    # hpZ: backward gathers inside the node (7/8 of them sent), the network carries none of them.
    assert rows["hpZ"].backward_gather == round(2 * (P - R - E) * 7 / 8)
    assert rows["hpZ"].node_network == pytest.approx(none.node_network - none.backward_gather, abs=2)
    assert rows["hpZ"].secondary_bytes == 2 * (P - R) // 8
    # qgZ: the network carries the node's int8 sums, one per other node.
    qgz = rows["qgZ"]
    network = none.forward_gather + none.backward_gather + (1 + 4 / 256) * P * 3 / 4
    assert qgz.node_network == pytest.approx(network, abs=2)
    everything = rows["qwZ+hpZ+qgZ"]
    assert everything.node_network < 0.35 * none.node_network
    assert everything.inter_seconds < 0.35 * none.inter_seconds


def test_command_shows_what_going_multi_node_costs(config_dir, capsys):
    assert estimate_command([str(config_dir), "--gpus", "8"]) == 0
    one_out = capsys.readouterr().out
    one_node = table_rows(one_out, "communication")
    assert estimate_command([str(config_dir), "--gpus", "8", "--nodes", "2", "--inter-gbps", "50"]) == 0
    out = capsys.readouterr().out
    two_nodes = table_rows(out, "communication")
    assert "16 rank(s)" in out and "inter-node 50 Gb/s per node" in out
    assert "the inter-node network bounds the step's communication" in out
    for stage in "0123":
        # (collectives, reduce, gather, total, intra-node, inter-node, time)
        assert one_node[stage,][5] == "-" and one_node[stage,][6] == one_node[stage,][4]
        assert two_nodes[stage,][5] != "-" and two_nodes[stage,][6] == two_nodes[stage,][5]
    # Twice the ranks send a little more each: (W-1)/W grows from 7/8 to 15/16.
    assert float(two_nodes["0",][3]) > float(one_node["0",][3])
    # On several nodes, stage 3 with each ZeRO++ option (one node has nothing to save between nodes).
    assert "Stage 3 with ZeRO++" in out and "ZeRO++" not in one_out
    zeropp = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("none ", "qwZ"))}
    assert float(zeropp["qwZ+hpZ+qgZ"][6]) < 0.35 * float(zeropp["none"][6])  # node network


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/no/such/folder/config.json"], "no such file or folder"),
        (["./missing-model"], "no such file or folder"),
        (["no-such-org/no-such-model"], "nor a Hub model id in the local Hugging Face cache"),
        (["{config}", "--gpu-memory", "80XB"], "'80XB' is not a size"),
        (["{config}", "--gpus", "0"], "'0' is not a whole number of at least 1"),
        (["{config}", "--inter-gbps", "fast"], "'fast' is not a bandwidth"),
        (["{empty}"], "a folder without a config.json"),
        (["{bad_json}"], "is not a model config transformers knows"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, config_dir, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 3}))
    paths = {
        "config": str(config_dir),
        "empty": str(tmp_path / "empty"),
        "bad_json": str(tmp_path / "bad.json"),
    }
    assert estimate_command([arg.format(**paths) for arg in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-zero estimate: "), captured.err
    assert message in lines[0]


def test_hub_id_is_read_from_the_local_cache(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    tiny_config("llama").save_pretrained(snapshot)
    (tmp_path / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert estimate_command(["tiny-org/tiny-llama"]) == 0
    assert "1,115,264 parameters" in capsys.readouterr().out
