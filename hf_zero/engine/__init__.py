"""The engine: `ZeroEngine` and `initialize` (`zero_engine.py`), its weights and training state
(`state.py`), the step (`step.py`, with where its pieces live in `step_places.py`, and
`fused_step.py`, `optim.py`, `loss_scaler.py`), the gradient reducers (`grad_sync.py`), the
stage-3 gatherer (`gather.py`), the rules of order (`rules_of_order.py`), the ordinary PyTorch
calls routed to it (`user_paths.py`) and its teardown (`teardown.py`)."""
