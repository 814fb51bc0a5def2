"""Launched by the NVMe tests: the host memory one process's training takes with each optimizer
offload, read off the kernel's own peak-RSS counter.

    python -m hf_zero.testing.offload_memory OFFLOAD SWAP_DIR

Builds a GPT-2-shaped model of about 115 MB (fp32, 16 layers) and its AdamW, resets the process's peak RSS
(`/proc/self/clear_refs`; where a kernel does not offer it, a thread samples the RSS every
millisecond instead), then shards it (one rank, stage 1, fp32) and trains 3 steps, and prints
one JSON line: the peak RSS growth over the RSS before `initialize`, the bytes of the masters and
Adam state, the engine's own memory breakdown.
"""

from __future__ import annotations

import json
import sys
import threading

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_zero


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakRSS:
    """The process's peak RSS from now on."""

    def __init__(self) -> None:
        self.start = _status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # the kernel's peak (VmHWM) restarts from the current RSS
            self._sampled = None
        except OSError:
            self._sampled = self.start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, _status("VmRSS"))

    def growth(self) -> int:
        if self._sampled is None:
            return _status("VmHWM") - self.start
        self._stop.set()
        self._thread.join()
        return max(self._sampled, _status("VmRSS")) - self.start


def main() -> None:
    offload, swap = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    config = GPT2Config(n_embd=384, n_layer=16, n_head=4, vocab_size=512, n_positions=64)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 512, (2, 32))
    numel = sum(p.numel() for p in model.parameters())
    peak = PeakRSS()
    zero = {
        "stage": 1,
        "precision": "fp32",
        "offload_optimizer": offload,
        "nvme_path": swap,
        "nvme_buffer_count": 2,
    }
    engine = hf_zero.initialize(model, optimizer, zero)
    for _ in range(3):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    report = {
        "growth": peak.growth(),
        "state": numel * 4 * 3,  # fp32 masters, exp_avg, exp_avg_sq
        "memory": engine.memory_breakdown(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
