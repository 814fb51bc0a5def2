"""Launchable checks of hf_zero against unsharded training.

These modules build tiny Hub-architecture models from configs (no downloads), run the same
training sharded and unsharded, and are driven by the test suite through the real launcher
(`torchrun`). They run unchanged on GPUs with NCCL, so a cluster can check its own set-up.
"""
