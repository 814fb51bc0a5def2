"""Which checkpoint a run resumes from by itself: the newest complete one in its output folder.

The Trainer writes a checkpoint folder (`checkpoint-<step>`) in order: the weights, the engine's
checkpoint (`hf_zero_checkpoint/`, complete once its manifest exists), the LR schedule, the RNG
states and last `trainer_state.json`. A process killed during any of it leaves a folder without a
readable `trainer_state.json` (or without a finished engine checkpoint), which is passed over for
the previous one. `ZeroTrainer.train(resume_from_checkpoint="auto")` and recipes restarted by
`hf-zero train --max-restarts` resume through it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoint.format import MANIFEST, TRAINER_SUBFOLDER, is_checkpoint

# The value of `resume_from_checkpoint` that asks for the newest complete checkpoint, or none.
AUTO = "auto"
TRAINER_STATE = "trainer_state.json"
_STEP = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def restarted() -> bool:
    """Whether this process is a worker that a launcher restarted after a failure (torchrun's
    `--max-restarts` counts the restarts in TORCHELASTIC_RESTART_COUNT)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """The step a Trainer checkpoint folder's name gives (`checkpoint-20` -> 20), else None."""
    match = _STEP.match(Path(folder).name)
    return int(match.group(1)) if match else None


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether a Trainer checkpoint folder was written to the end: its trainer state reads and
    names the folder's step, and its optimizer state (the engine's checkpoint with the LR
    schedule, or the plain Trainer's files) is there."""
    folder = Path(folder)
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != checkpoint_step(folder):
        return False
    engine = is_checkpoint(folder / TRAINER_SUBFOLDER)
    return (folder / SCHEDULER_NAME).is_file() and (engine or (folder / OPTIMIZER_NAME).is_file())


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint folder in `output_dir` (by step), or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(checkpoint_step(path), path) for path in root.iterdir() if path.is_dir()]
    for _, path in sorted(((step, path) for step, path in found if step is not None), reverse=True):
        if is_complete(path):
            return str(path)
    return None


def describe_checkpoint(folder: str | os.PathLike) -> str:
    """`checkpoint-20, saved by 2 processes at stage 2` (the engine's checkpoint says by whom)."""
    folder = Path(folder)
    manifest_path = folder / TRAINER_SUBFOLDER / MANIFEST
    manifest: dict[str, Any] = {}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
    if "world_size" not in manifest:
        return f"{folder.name} (saved by the plain Trainer)"
    processes = manifest["world_size"]
    return f"{folder.name}, saved by {processes} process{'es' if processes != 1 else ''} at stage {manifest['stage']}"
