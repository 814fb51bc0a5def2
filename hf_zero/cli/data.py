"""Training data the project generates itself, so recipes and tests need no downloads.

`markov_corpus` samples token sequences from a sparse random first-order Markov chain: every
token has a few likely successors. A language model starts at a loss of about ln(vocab) and can
learn its way down to the chain's entropy (below ln(branching)), so a falling loss is visible
within a few hundred steps even on a CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported where a dataset is built: `hf-zero train`'s launcher never needs it
    import datasets


def markov_corpus(
    num_sequences: int, sequence_length: int, vocab_size: int, branching: int = 4, seed: int = 0
) -> torch.Tensor:
    """A `(num_sequences, sequence_length)` tensor of token ids drawn from a fixed random chain."""
    if branching < 1 or branching > vocab_size:
        raise ValueError(f"branching={branching} must be between 1 and vocab_size={vocab_size}")
    generator = torch.Generator().manual_seed(seed)
    successors = torch.stack(
        [torch.randperm(vocab_size, generator=generator)[:branching] for _ in range(vocab_size)]
    )
    # Normalised exponential draws are Dirichlet(1) transition probabilities, from our own generator.
    weights = -torch.log(torch.rand(vocab_size, branching, generator=generator))
    weights = weights / weights.sum(dim=1, keepdim=True)
    tokens = torch.empty(num_sequences, sequence_length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab_size, (num_sequences,), generator=generator)
    for position in range(1, sequence_length):
        previous = tokens[:, position - 1]
        choice = torch.multinomial(weights[previous], 1, generator=generator).squeeze(1)
        tokens[:, position] = successors[previous, choice]
    return tokens


def causal_lm_dataset(tokens: torch.Tensor) -> datasets.Dataset:
    """A causal-LM dataset (`input_ids`, `labels`) over the rows of `tokens`, yielding tensors."""
    import datasets

    rows = tokens.tolist()
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": rows}).with_format("torch")
