"""Dense-gradient kernels of the hybrid distillation objective (seed 000, Prop. 5 / eq. 11, B.2).

Public API:
- `hybrid_loss(logits, teacher_logprobs, ids=None, *, teacher_weights=None, targets=None,
  inplace_grad=False, backend="auto", teacher_is_logits=False) -> HybridLoss(kl, target_logprob)`
- `dense_kl(logits, teacher_logprobs, ids=None, *, backend="auto") -> kl [N]`
- `fused_linear_hybrid_loss(hidden, weight, teacher_logprobs, ids=None, *, ..., advantages=None,
  kl_weights=None, chunk_size=None, backend="auto")`: the same fused with the LM head, chunked.
- `reference`: the float64 reference shared by tests and benchmarks.
Teacher log-probs below `LOGQ_FLOOR` (e.g. −inf) are clamped to it; student logits of −inf give
p = 0 and contribute nothing. Backends: Triton on GPU (and on CPU under TRITON_INTERPRET=1), a
chunked fused torch path on CPU. Depends on torch (and triton, optional at run time) only.
Tests: `pytest tests/test_kernels_*.py`.
"""

from kernels import reference
from kernels.dense_kl import HybridLoss, dense_kl, hybrid_loss
from kernels.fused_linear import fused_linear_hybrid_loss
from kernels.reference import LOGQ_FLOOR
from kernels.validation import BackendUnavailableError, KernelError, KernelInputError

__all__ = [
    "LOGQ_FLOOR",
    "BackendUnavailableError",
    "HybridLoss",
    "KernelError",
    "KernelInputError",
    "dense_kl",
    "fused_linear_hybrid_loss",
    "hybrid_loss",
    "reference",
]
