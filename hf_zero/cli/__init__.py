"""The product side: the `hf-zero` command (`main.py`), recipes (`recipes.py`) with their data
(`recipe_data.py`, `data.py`, `text_corpus.py`, `tokenizer_training.py`), what a run reports
(`run_report.py`), `hf-zero estimate` (`estimate.py`) and the tested versions (`tested_versions.py`)."""

from .main import main

__all__ = ["main"]
