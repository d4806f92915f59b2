"""Models of ``distill demo``, built offline: ``python -m services.control.demo_models DIR --role R``.

The teacher is a tiny Llama trained for a few seconds to continue counting sequences
``w_i w_i+1 w_i+2 ...`` (a peaked, meaningful distribution to distill from); the student is a
narrower random model with the same tokenizer. Runs in a child process: the control plane
itself never imports torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.teacher.tiny_model import SPECIALS, TinySpec, build_tiny_model

VOCAB = 64  # <pad> <unk> <s> </s> w0 .. w59


def train_counting(model_dir: Path, steps: int, lr: float = 3e-3, seed: int = 0) -> float:
    """Teach the model at ``model_dir`` to count (in place); returns the last training loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    first, words = len(SPECIALS), model.config.vocab_size - len(SPECIALS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, words, (32, 1))
        ids = first + (starts + torch.arange(12)) % words  # (32, 12), wrapping around
        ids = torch.cat([torch.full((32, 1), tokenizer.bos_token_id), ids], 1)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(model_dir)
    return float(loss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--role", choices=["teacher", "student"], required=True)
    p.add_argument("--train-steps", type=int, default=150, help="teacher only")
    a = p.parse_args()
    if a.role == "teacher":
        build_tiny_model(a.out_dir, TinySpec(vocab_size=VOCAB, hidden_size=64, seed=1))
        print(f"teacher counting loss: {train_counting(a.out_dir, a.train_steps):.4f}")
    else:
        build_tiny_model(a.out_dir, TinySpec(vocab_size=VOCAB, hidden_size=16, seed=2))


if __name__ == "__main__":
    main()
