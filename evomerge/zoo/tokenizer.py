"""One character-level tokenizer shared by every zoo model, saved as a plain `tokenizer.json`."""
from __future__ import annotations

from evomerge.zoo.skills import LETTERS

CHARS = "0123456789" + "abcdefghijklmnopqrstuvwxyz" + "+-=: "
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_tokenizer():
    """A `PreTrainedTokenizerFast` that splits text into single characters (no merges, no pickles)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert set(LETTERS) <= set(CHARS)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )
