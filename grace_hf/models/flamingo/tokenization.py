"""A small byte-level BPE tokenizer trained offline, for the tiny preset, the demo and the tests."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["END_OF_CHUNK_TOKEN", "MEDIA_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "train_tokenizer"]

END_OF_CHUNK_TOKEN = "<|endofchunk|>"
MEDIA_TOKEN = "<image>"
PAD_TOKEN = "<PAD>"
# ids 0, 1, 2 in a trained tokenizer (the tiny preset's end_of_chunk/media/pad ids)
SPECIAL_TOKENS = (END_OF_CHUNK_TOKEN, MEDIA_TOKEN, PAD_TOKEN)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE on `texts`; every digit is its own token.

    The special tokens `<|endofchunk|>` (eos), `<image>` and `<PAD>` (pad) get ids 0, 1, 2.

    Example:
        >>> tok = train_tokenizer(["a dog runs", "id 1 2 3"], vocab_size=300)
        >>> tok.convert_ids_to_tokens(tok("<image>id 12<|endofchunk|>").input_ids)[:2]
        ['<image>', 'id']
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_CHUNK_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[MEDIA_TOKEN],
        padding_side="right",
    )
