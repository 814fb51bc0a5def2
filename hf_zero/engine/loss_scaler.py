"""fp16 loss scaling, with DeepSpeed's knobs and rules.

`backward` multiplies the loss by `scale` so small gradients survive in fp16; the optimizer step
divides it out again (folded into its gradient factor). A step whose gradient holds an inf or a
NaN on any rank is skipped on every rank, and the scaler is told so (`update`):

- dynamic scaling (`loss_scale=0`): start at 2**initial_scale_power. An overflow first uses up
  the hysteresis (`hysteresis - 1` overflows leave the scale alone), then halves the scale (never
  below `min_loss_scale`). After `loss_scale_window` overflow-free steps in a row the scale
  doubles and the hysteresis is restored.
- static scaling (`loss_scale > 0`): the scale never changes; overflowing steps are still skipped.

An overflow with the dynamic scale already at its minimum, on two steps in a row, means the
gradients overflow fp16 unscaled: that raises instead of skipping forever.
"""

from __future__ import annotations

from typing import Any

from ..config.zero_config import ZeroConfig

_STATE_KEYS = ("scale", "clean_steps", "hysteresis_left", "skipped_steps", "overflows_at_minimum")


class LossScaler:
    """The loss scale of one engine, and its history (see the module docstring)."""

    def __init__(self, config: ZeroConfig) -> None:
        self.dynamic = config.loss_scale == 0
        self.scale = 2.0**config.initial_scale_power if self.dynamic else float(config.loss_scale)
        self.window = config.loss_scale_window
        self.hysteresis = config.hysteresis
        self.min_scale = config.min_loss_scale
        self.clean_steps = 0  # overflow-free steps since the last overflow or growth
        self.hysteresis_left = self.hysteresis
        self.skipped_steps = 0
        self.overflows_at_minimum = 0  # consecutive overflowing steps with the scale at its minimum

    def update(self, overflow: bool) -> None:
        """Record one optimizer step: skipped for an overflow, or taken."""
        if not overflow:
            self.overflows_at_minimum = 0
            self.clean_steps += 1
            if self.dynamic and self.clean_steps >= self.window:
                self.scale *= 2.0
                self.clean_steps = 0
                self.hysteresis_left = self.hysteresis
            return
        self.skipped_steps += 1
        self.clean_steps = 0
        if not self.dynamic:
            return
        if self.scale <= self.min_scale:
            self.overflows_at_minimum += 1
            if self.overflows_at_minimum >= 2:
                raise FloatingPointError(
                    f"fp16 gradients overflowed on {self.overflows_at_minimum} steps in a row with the loss "
                    f"scale at its minimum (min_loss_scale={self.min_scale:g}): the gradients leave fp16's "
                    "range even unscaled, so every step would be skipped. Try precision='bf16' (same memory, "
                    "fp32's range, no loss scaling), a lower learning rate, gradient clipping (max_grad_norm), "
                    "or a smaller min_loss_scale"
                )
        if self.hysteresis_left > 1:
            self.hysteresis_left -= 1
        else:
            self.scale = max(self.scale / 2.0, self.min_scale)

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state as plain numbers (JSON-friendly; checkpoints keep it)."""
        return {key: getattr(self, key) for key in _STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; a static scale stays as configured."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"loss scaler state lacks {missing}; expected the keys {list(_STATE_KEYS)}")
        for key in _STATE_KEYS:
            if key == "scale" and not self.dynamic:
                continue
            setattr(self, key, type(getattr(self, key))(state[key]))
