"""What the engine is built from, with no transformers import: units (`units.py`), where each
parameter lives in a flat buffer (`layout.py`, `arena.py`), the flat segments (`flat_group.py`),
the counted collectives (`distributed.py`), the device layer (`device.py`) and the checks on which
parameters the engine manages (`params.py`)."""
