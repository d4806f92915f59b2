"""Tokenizer fingerprint: a sha256 over the sorted vocabulary (token → id) and the special tokens.

Two tokenizers with the same fingerprint map text to the same ids, so a student and a teacher
with equal fingerprints can be distilled token by token. Used by the teacher's ``Info`` and by
whoever registers a student against a teacher.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Protocol


class VocabTokenizer(Protocol):
    """What the fingerprint needs of a tokenizer (transformers tokenizers have both)."""

    def get_vocab(self) -> Mapping[str, int]: ...

    @property
    def all_special_tokens(self) -> list[str]: ...


def fingerprint(tokenizer: VocabTokenizer) -> str:
    """``sha256:<hex>`` of the canonical JSON of the vocabulary and the special tokens with their ids."""
    vocab = tokenizer.get_vocab()
    special = sorted({tok: vocab.get(tok, -1) for tok in tokenizer.all_special_tokens}.items())
    canonical = json.dumps(
        {"vocab": sorted(vocab.items()), "special": special}, ensure_ascii=False, separators=(",", ":")
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
