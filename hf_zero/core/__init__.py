"""What the engine is built from, with no transformers import: units (`units.py`), where each
parameter lives in a flat buffer (`layout.py`, `arena.py`), the flat segments (`flat_group.py`,
their host side under offload in `host_placement.py`), the counted collectives
(`distributed.py`), the device layer (`device.py`), the checks on which parameters the engine
manages (`params.py`) and what the code around the engine may use of it (`engine_view.py`)."""
