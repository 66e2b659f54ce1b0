"""Tokenizers: the checkpoint's tokenizer.json, or a byte-level one for presets.

Presets have random weights, so their text is gibberish, but `--prompt` works on
them end to end: ids 0..2 are <pad>, <eos>, <bos>; ids 3..258 are the 256 bytes.
"""

from __future__ import annotations

from glmc.errors import GlmcError

_SPECIALS = ["<pad>", "<eos>", "<bos>"]


def byte_tokenizer_json(vocab_size: int) -> str | None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    if vocab_size < len(_SPECIALS) + 256:
        return None
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(ByteLevel.alphabet(), key=lambda c: ord(c)):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    return tok.to_str()


class TextCodec:
    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(tokenizer_json)

    def encode(self, text: str) -> list[int]:
        if not text:
            raise GlmcError("the prompt is empty")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
