"""Train a small tokenizer on a recipe's own text with `tokenizers`, for runs that start from a
model config rather than a pretrained checkpoint (which brings its tokenizer)."""

from __future__ import annotations

from collections.abc import Iterable

# The special tokens each family expects, by the task's model kind.
WORDPIECE_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
BPE_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, show_progress: bool = False):
    """A `transformers` fast tokenizer trained on `texts`.

    `kind="wordpiece"`: BERT's scheme (lower-casing, WordPiece, `[CLS] ... [SEP]` around every
    sequence, a `[MASK]` token for masked-LM). `kind="bpe"`: byte-level BPE as GPT-2 and Llama use
    (any text round-trips), with `<s>`/`</s>` begin/end tokens and a `<pad>` token.
    `show_progress`: the `tokenizers` progress bars (off by default: away from a terminal they
    still print a blank line per training stage).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":
        specials = WORDPIECE_SPECIALS
        tokenizer = Tokenizer(models.WordPiece(unk_token=specials["unk_token"]))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=list(specials.values()), show_progress=show_progress
        )
        tokenizer.train_from_iterator(texts, trainer)
        cls, sep = specials["cls_token"], specials["sep_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
        )
    elif kind == "bpe":
        specials = BPE_SPECIALS
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(specials.values()),
            show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tokenizer.train_from_iterator(texts, trainer)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected 'wordpiece' or 'bpe'")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)
