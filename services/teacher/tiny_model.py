"""A tiny randomly initialised Llama teacher and tokenizer, built offline (no hub access).

Used by tests, the benchmark and smoke runs: ``python -m services.teacher.tiny_model OUT_DIR``
writes a directory that ``python -m services.teacher --model OUT_DIR`` can serve.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


@dataclass
class TinySpec:
    vocab_size: int = 512  # tokenizer and embedding size
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 256  # max_position_embeddings
    seed: int = 0
    tokenizer_salt: str = ""  # a different salt gives a tokenizer with another fingerprint
    add_bos: bool = False  # the tokenizer starts every text with <s>, as Llama's does


def build_tiny_model(out_dir: Path, spec: TinySpec | None = None, words: Sequence[str] = ()) -> Path:
    """Save a random ``LlamaForCausalLM`` and a word-level tokenizer of ``spec.vocab_size`` ids.

    The tokenizer's words after the specials are ``words`` when given (then they set the vocab
    size), else ``w0 w1 ...``.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = spec or TinySpec()
    if words:
        spec = replace(spec, vocab_size=len(SPECIALS) + len(words))
    else:
        words = [f"w{spec.tokenizer_salt}{i}" for i in range(spec.vocab_size - len(SPECIALS))]
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if spec.add_bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_length,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=TinySpec.vocab_size)
    parser.add_argument("--hidden-size", type=int, default=TinySpec.hidden_size)
    parser.add_argument("--num-layers", type=int, default=TinySpec.num_layers)
    parser.add_argument("--num-heads", type=int, default=TinySpec.num_heads)
    parser.add_argument("--max-length", type=int, default=TinySpec.max_length)
    parser.add_argument("--seed", type=int, default=TinySpec.seed)
    a = parser.parse_args()
    spec = TinySpec(a.vocab_size, a.hidden_size, a.num_layers, a.num_heads, a.max_length, a.seed)
    build_tiny_model(a.out_dir, spec)


if __name__ == "__main__":
    main()
