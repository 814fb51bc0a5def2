"""`hf_zero/core/arena.py`: views carved from one allocation, merged back where they sit end to end, and
freed once nothing uses the allocation any more."""

from __future__ import annotations

import torch

from hf_zero.core.arena import carve, carve_ordered, merge_adjacent, nbytes, segment_order


def test_carved_views_sit_end_to_end_in_one_zeroed_allocation():
    views = carve([3, 0, 5], torch.float32, torch.device("cpu"))
    assert [v.numel() for v in views] == [3, 0, 5]
    storage = views[0].untyped_storage()
    assert all(v.untyped_storage().data_ptr() == storage.data_ptr() for v in views)
    assert storage.nbytes() == 8 * 4
    assert views[2].storage_offset() == 3
    assert all(not v.any() for v in views)
    views[2].fill_(1)
    assert views[0].sum() == 0 and nbytes(views[2]) == 20


def test_carve_ordered_lays_items_out_by_key_one_allocation_per_dtype():
    # Item order is unit by unit; the keys put each param group's items end to end.
    keys = [
        segment_order(0, torch.bfloat16),
        segment_order(1, torch.bfloat16),
        segment_order(0, torch.bfloat16),
    ]
    dtypes = [torch.bfloat16, torch.bfloat16, torch.bfloat16]
    views = carve_ordered([4, 2, 6], dtypes, keys, torch.device("cpu"))
    assert [v.storage_offset() for v in views] == [0, 10, 4]  # group 0's two items first
    mixed = carve_ordered([4, 2], [torch.bfloat16, torch.float32], [(0, "a"), (0, "b")], torch.device("cpu"))
    assert mixed[0].dtype == torch.bfloat16 and mixed[1].dtype == torch.float32
    assert mixed[0].untyped_storage().data_ptr() != mixed[1].untyped_storage().data_ptr()


def test_rows_that_continue_each_other_in_every_column_merge_into_one():
    a = carve([4, 4, 4], torch.float32, torch.device("cpu"))
    b = carve([4, 4, 4], torch.bfloat16, torch.device("cpu"))
    rows = [(a[0], b[0], None), (a[1], b[1], None), (a[2], b[2], None)]
    (merged,) = merge_adjacent(rows)
    assert merged[2] is None and merged[0].numel() == merged[1].numel() == 12
    merged[0].fill_(2)
    merged[1].fill_(3)
    assert all(bool((t == 2).all()) for t in a) and all(bool((t == 3).all()) for t in b)
    # One column out of order (or a None beside a tensor) breaks the run there.
    swapped = merge_adjacent([(a[0], b[1]), (a[1], b[0]), (a[2], b[2])])
    assert [row[0].numel() for row in swapped] == [4, 4, 4]
    assert len(merge_adjacent([(a[0], None), (a[1], b[1])])) == 2
    separate = torch.zeros(4)
    assert len(merge_adjacent([(a[2],), (separate,)])) == 2


def test_carved_tensors_hold_the_allocation_only_through_its_storage():
    # An autograd view would keep the whole allocation alive through `_base` after the tensor is
    # re-pointed elsewhere (NVMe offload binds optimizer state to its swap buffers): it leaked the
    # moments of every segment once.
    views = carve([1 << 16, 1 << 16], torch.float32, torch.device("cpu"))
    assert all(view._base is None for view in views)
    (merged,) = merge_adjacent([(view,) for view in views])
    assert merged[0]._base is None
    elsewhere = torch.zeros(1 << 16)
    views[0].set_(elsewhere.untyped_storage(), 0, (1 << 16,), (1,))
    assert views[0].data_ptr() == elsewhere.data_ptr()


def test_a_stage_3_step_after_an_optimizer_state_load_still_launches_once_per_param_group(monkeypatch):
    """State loaded from elsewhere gives every segment separate moment tensors; the next step packs
    them into one allocation again, so each param group is still stepped in one kernel call (also
    in a world of one, whose gradients sit end to end too)."""
    import hf_zero
    from hf_zero.engine import fused_step
    from hf_zero.testing.tiny_models import build_model, make_samples, slice_samples

    model = build_model("llama")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    engine = hf_zero.initialize(model, optimizer, {"stage": 3})
    samples = make_samples("llama", 4)
    calls = []
    original = fused_step.adam_step
    monkeypatch.setattr(fused_step, "adam_step", lambda *args: calls.append(1) or original(*args))

    def step(index: int) -> None:
        engine.backward(engine(**slice_samples(samples, index, 2)).loss)
        engine.step()
        engine.zero_grad()

    step(0)
    assert len(engine.groups) > 2 and len(calls) == 2
    # State from elsewhere (a checkpoint's files): a separate tensor per segment and key.
    saved = optimizer.state_dict()
    saved["state"] = {
        index: {key: value.clone() for key, value in state.items()} for index, state in saved["state"].items()
    }
    optimizer.load_state_dict(saved)
    calls.clear()
    step(2)
    assert len(calls) == 2
    for index in range(2):  # each param group's moments in one allocation again
        moments = [optimizer.state[g.master]["exp_avg"] for g in engine.groups if g.optimizer_group == index]
        assert len(moments) > 1 and len({m.untyped_storage().data_ptr() for m in moments}) == 1
    engine.close()
