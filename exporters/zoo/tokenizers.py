"""Tokenizers for the zoo, built with Hugging Face `tokenizers` and shipped in the bundle as
tokenizer.json (the device side needs only the `tokenizers` wheel)."""
from __future__ import annotations

import string

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def char_wordpiece_json() -> str:
    """A character-level WordPiece tokenizer (~140 tokens) for the tiny model: real text in,
    real ids out, no vocabulary file to ship."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + ["##" + c for c in chars])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return tok.to_str()
