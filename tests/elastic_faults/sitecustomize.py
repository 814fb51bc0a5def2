"""Fault injection for tests/test_elastic.py, and nothing else: the test puts this folder first on
PYTHONPATH, so every Python process it starts imports this file. In a torchrun worker it SIGKILLs
the process at the points `HF_ZERO_TEST_KILLS` names, each `ATTEMPT:RANK:POINT:STEP` (comma
separated): on that restart attempt (TORCHELASTIC_RESTART_COUNT), on that rank, at

- `after-save`: once the Trainer's checkpoint of STEP is written (on rank 0, which writes the
  trainer state last, the checkpoint is then complete);
- `mid-save`: once this rank has written its file of the engine's checkpoint at STEP, before the
  checkpoint is finished.

The library has no test hooks: this replaces functions in the worker's own modules.
"""

import os
import signal


def _kills() -> list[tuple[str, int]]:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    rank = os.environ.get("RANK")
    chosen = []
    for spec in os.environ.get("HF_ZERO_TEST_KILLS", "").split(","):
        if spec:
            kill_attempt, kill_rank, point, step = spec.split(":")
            if kill_attempt == attempt and kill_rank == rank:
                chosen.append((point, int(step)))
    return chosen


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(kills: list[tuple[str, int]]) -> None:
    from hf_zero.checkpoint import save as save_module
    from hf_zero.integrations.trainer import ZeroTrainer

    after = {step for point, step in kills if point == "after-save"}
    middle = {step for point, step in kills if point == "mid-save"}
    save_checkpoint = ZeroTrainer._save_checkpoint
    write_rank_file = save_module._write_rank_file

    def _save_checkpoint(self, model, trial):
        save_checkpoint(self, model, trial)
        if self.state.global_step in after:
            _die()

    def _write_rank_file(job, tensors):
        info = write_rank_file(job, tensors)
        if job.step in middle:
            _die()
        return info

    ZeroTrainer._save_checkpoint = _save_checkpoint
    save_module._write_rank_file = _write_rank_file


if "RANK" in os.environ and _kills():
    _install(_kills())
