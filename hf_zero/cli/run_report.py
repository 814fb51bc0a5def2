"""What a recipe run shows and leaves behind: log lines that carry the step (under the Trainer's
progress bar on a terminal, plain lines in a log file or pipe), and the loss and metric curves as a
PNG in the output folder."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from ..hub.model_card import TRAINER_BOOKKEEPING
from ..hub.saving import write_atomically


def interactive_output() -> bool:
    """Whether progress bars belong in this process's output: only when both stdout and stderr
    are terminals. The bars redraw themselves on stderr with carriage returns and cursor escapes,
    and the log lines go to stdout; once either is captured (`> log 2>&1`, a pipe, nohup, CI) the
    bars' escapes would end up glued to the log lines, so everything is written as plain lines."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def format_log(step: int, max_steps: int, logs: dict[str, Any]) -> str:
    """One line for a Trainer log entry: `step 25/200: loss 3.21, grad_norm 1.02, ...`; evaluation
    entries read `step 100/200 eval: loss 2.10, perplexity 8.2, ...`."""
    evaluation = any(key.startswith("eval_") for key in logs)
    values = []
    for key, value in logs.items():
        if key in TRAINER_BOOKKEEPING:
            continue
        name = key.removeprefix("eval_") if evaluation else key
        values.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    kind = " eval" if evaluation else ""
    return f"step {step}/{max_steps}{kind}: " + ", ".join(values)


class StepProgressCallback(ProgressCallback):
    """The Trainer's tqdm progress bar (steps, ETA), with each log written above it as one line
    that names its step. `quiet` stops the lines (the bar stays)."""

    quiet = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and not self.quiet:
            line = format_log(state.global_step, state.max_steps, logs)
            if self.training_bar is not None:
                self.training_bar.write(line)
            else:
                print(line, flush=True)


class StepPrinterCallback(TrainerCallback):
    """Without a progress bar (`disable_tqdm`): each log printed as one line that names its step."""

    quiet = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and not self.quiet:
            # One write per record: another process sharing the stream (a warning from rank 1)
            # cannot land between a line and its newline.
            sys.stdout.write(format_log(state.global_step, state.max_steps, logs) + "\n")
            sys.stdout.flush()


def install_step_logging(trainer) -> TrainerCallback:
    """Replace the Trainer's own log printing with the step-carrying lines; returns the callback."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    callback = StepPrinterCallback() if trainer.args.disable_tqdm else StepProgressCallback()
    trainer.add_callback(callback)
    return callback


def plot_curves(
    log_history: list[dict[str, Any]], path: str | os.PathLike, metrics: tuple[str, ...]
) -> Path | None:
    """Draw the training loss, the evaluation loss and the evaluation `metrics` against the step
    into a PNG at `path`; returns it, or None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    from matplotlib import pyplot

    train, evaluation = _series(log_history, "loss"), _series(log_history, "eval_loss")
    curves = {name: _series(log_history, f"eval_{name}") for name in metrics}
    curves = {name: series for name, series in curves.items() if series[0]}
    if not train[0] and not evaluation[0]:
        return None
    panels = 1 + len(curves)
    figure, axes = pyplot.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    loss_axis = axes[0][0]
    if train[0]:
        loss_axis.plot(*train, label="train loss")
    if evaluation[0]:
        loss_axis.plot(*evaluation, marker="o", label="eval loss")
    loss_axis.set(xlabel="step", ylabel="loss", title="loss")
    loss_axis.legend()
    panel_values = [train[1] + evaluation[1]]
    for index, (name, series) in enumerate(curves.items(), start=1):
        axis = axes[0][index]
        axis.plot(*series, marker="o", color="tab:green")
        axis.set(xlabel="step", ylabel=name, title=f"eval {name}")
        panel_values.append(series[1])
    for axis, values in zip(axes[0], panel_values, strict=True):
        axis.grid(alpha=0.3)
        limits = y_limits(values)
        if limits is not None:
            axis.set_ylim(*limits)
    figure.tight_layout()
    try:
        write_atomically(path, lambda partial: figure.savefig(partial, dpi=100, format="png"))
    finally:
        pyplot.close(figure)
    return Path(path)


def y_limits(values: list[float], min_relative_span: float = 0.1) -> tuple[float, float] | None:
    """The y-axis limits of a panel whose values barely move, else None (matplotlib's autoscale).

    Autoscaling stretches any change over the whole panel, so two evaluations 0.003 apart look like
    a collapse. The axis spans at least `min_relative_span` of the largest magnitude shown, centred
    on the values: a tenth, because a change of a few percent in a loss, accuracy or perplexity
    is what a reader should see as small, and a move of a tenth or more still fills the panel
    as it does under autoscale. Values that move more than that, or that are all zero, autoscale.
    """
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return None
    low, high = min(finite), max(finite)
    span = min_relative_span * max(abs(low), abs(high))
    if high - low >= span:
        return None
    middle = (low + high) / 2
    return middle - span / 2, middle + span / 2


def _series(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    entries = [entry for entry in log_history if key in entry]
    return [entry["step"] for entry in entries], [entry[key] for entry in entries]
