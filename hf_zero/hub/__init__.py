"""Hugging Face model folders in and out: `from_pretrained` reading each rank's own bytes
(`loading.py`, `weight_map.py`, `pending.py`, `weights.py`), the unit-by-unit `save_pretrained`
writer (`saving.py`) and the model card written beside it (`model_card.py`)."""
