"""hf_zero's Triton kernels, imported as `hf_zero.kernels` (never as a top-level `kernels`: see the
guard below and README.md in this folder).

Each op has a launcher that takes the Triton path for CUDA tensors and its PyTorch reference
elsewhere, the reference itself, and an interpreter test (`TRITON_INTERPRET=1`) that runs the
kernel on CPU tensors against the reference.
"""

import sys

if __name__ == "kernels":
    # Python started in a checkout of hf_zero (`python -m`, `python -c`, pytest, torchrun workers and
    # notebooks put the current folder first on sys.path) found this folder under the top-level
    # name `kernels`, which belongs to the Hugging Face Hub package that transformers imports.
    # Hand the name over to the installed package. Where none is installed, leave what Python gives
    # for a folder without __init__.py, an empty namespace package: libraries that probe for the Hub
    # package (transformers among them) read a module without __file__ or version as "not installed".
    import importlib.machinery
    import importlib.util
    import os

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        _spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        _spec.submodule_search_locations = []
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _installed  # what `import kernels` returns once this file has run
    if _spec.loader is not None:
        _spec.loader.exec_module(_installed)
else:
    from .adamw import AdamHyperparams, adam_step, adam_step_reference, adam_step_triton
    from .grad_stats import grad_stats, grad_stats_reference, grad_stats_triton
    from .quantize import (
        dequantize_int8,
        dequantize_int8_reference,
        dequantize_int8_triton,
        quantize_int8,
        quantize_int8_reference,
        quantize_int8_triton,
    )
    from .sgd import SGDHyperparams, sgd_step, sgd_step_reference, sgd_step_triton

    __all__ = [
        "AdamHyperparams",
        "SGDHyperparams",
        "adam_step",
        "adam_step_reference",
        "adam_step_triton",
        "dequantize_int8",
        "dequantize_int8_reference",
        "dequantize_int8_triton",
        "grad_stats",
        "grad_stats_reference",
        "grad_stats_triton",
        "quantize_int8",
        "quantize_int8_reference",
        "quantize_int8_triton",
        "sgd_step",
        "sgd_step_reference",
        "sgd_step_triton",
    ]
