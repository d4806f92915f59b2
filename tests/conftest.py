"""Test-session setup shared by every test module.

Triton decorates its own standard library (``tl.zeros``, ``tl.sum``, ...) when ``triton`` is first
imported, in interpreter mode only if ``TRITON_INTERPRET=1`` is set by then. Without a GPU the
Triton kernels can only run under the interpreter, so the whole session sets it before any test
module imports triton (child processes inherit it; their kernels pick the torch path on CPU).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
