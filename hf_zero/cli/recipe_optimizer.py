"""A recipe's optimizer beyond the Trainer's own `optim` names: `training.optim: muon`, with Muon's
settings in `training.optim_args`, trains the hidden matrices with `torch.optim.Muon` and the rest
with AdamW (see `ZeroTrainer.create_optimizer`)."""

from __future__ import annotations

from typing import Any

import torch

# Muon's settings a recipe may give in `training.optim_args`, with the type each is read as.
MUON_SETTINGS = {
    "lr": float,
    "momentum": float,
    "weight_decay": float,
    "nesterov": bool,
    "ns_steps": int,
    "eps": float,
}


def muon_settings(training: dict[str, Any], where: str = "") -> dict[str, Any] | None:
    """`training.optim: muon`: Muon's settings from `training.optim_args` ("lr=0.02,momentum=0.95");
    None for any other optimizer (the Trainer's own `optim` choices)."""
    if training.get("optim") != "muon":
        return None
    if getattr(torch.optim, "Muon", None) is None:
        raise ValueError(f"recipe {where}: training.optim=muon needs torch.optim.Muon (torch >= 2.9)")
    settings: dict[str, Any] = {}
    text = training.get("optim_args") or ""
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        key, _, value = item.partition("=")
        kind = MUON_SETTINGS.get(key.strip())
        if kind is None or not value:
            raise ValueError(
                f"recipe {where}: training.optim_args has {item!r}; Muon's settings are "
                f"{', '.join(f'{name}=...' for name in MUON_SETTINGS)} (comma-separated)"
            )
        value = value.strip()
        settings[key.strip()] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return settings
