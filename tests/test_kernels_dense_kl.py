"""Tests of kernels.dense_kl / hybrid_loss: reference maths, both backends, edge cases, bad input.

The triton backend runs on CPU tensors under triton's interpreter: the `interpret` fixture sets
TRITON_INTERPRET=1 with monkeypatch before the kernels are launched. That is enough because the
kernels are wrapped with `triton.jit` lazily at their first launch, so the order in which test
modules import `kernels` does not matter. The GPU test (bf16, V=151,936) needs `-m gpu`.
Run: `pytest tests/test_kernels_dense_kl.py -q`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

import kernels
from kernels import reference
from kernels.dense_kl import resolve_backend
from kernels.torch_backend import torch_backward, torch_forward
from kernels.validation import BackendUnavailableError, KernelInputError, check_inputs

# dtype → (atol, rtol) on the gradient, which is stored in the logits' dtype; kl and the target
# log-prob are fp32 outputs computed from the same rounded inputs, hence the tighter "stat" column.
TOLERANCES = {
    torch.float32: {"grad": (2e-6, 1e-4), "stat": (1e-5, 1e-5)},
    torch.float16: {"grad": (2e-4, 2e-3), "stat": (1e-5, 1e-5)},
    torch.bfloat16: {"grad": (2e-3, 1.6e-2), "stat": (1e-5, 1e-5)},
}
BACKENDS = ["torch", "triton"]


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return str(request.param)


@dataclass
class Case:
    logits: torch.Tensor  # (N, V)
    teacher: torch.Tensor  # (M, N, X) or (N, X)
    ids: torch.Tensor | None
    alpha: torch.Tensor | None
    targets: torch.Tensor | None
    teacher_is_logits: bool = False


def make_case(
    n: int = 6,
    v: int = 3001,
    k: int | None = None,
    m: int = 1,
    targets: bool = True,
    dtype: torch.dtype = torch.float32,
    scale: float = 3.0,
    seed: int = 0,
) -> Case:
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    lq_full = torch.log_softmax(torch.randn(m, n, v, generator=g, dtype=torch.float64) * 2, -1)
    ids = None
    lq = lq_full
    if k is not None:
        ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
        ids[0, -1] = -1  # padding inside a row
        lq = torch.gather(lq_full, 2, ids.clamp(min=0).expand(m, n, k))
    alpha = None if m == 1 else torch.rand(m, generator=g, dtype=torch.float64) + 0.25
    tgt = torch.randint(0, v, (n,), generator=g) if targets else None
    if tgt is not None:
        tgt[1] = -100
    teacher = lq[0] if m == 1 else lq
    return Case(z, teacher.to(dtype), ids, alpha, tgt)


def run_backend(
    case: Case, backend: str, g_kl: torch.Tensor, g_lp: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    leaf = case.logits.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf, so inplace_grad may overwrite its storage
    out = kernels.hybrid_loss(
        logits,
        case.teacher,
        case.ids,
        teacher_weights=case.alpha,
        targets=case.targets,
        inplace_grad=inplace,
        backend=backend,
        teacher_is_logits=case.teacher_is_logits,
    )
    ((out.kl * g_kl).sum() + (out.target_logprob * g_lp).sum()).backward()
    assert leaf.grad is not None
    return out.kl.detach(), out.target_logprob.detach(), leaf.grad


def expected(case: Case, g_kl: torch.Tensor, g_lp: torch.Tensor) -> tuple[torch.Tensor, ...]:
    c = case
    kl, lp = reference.hybrid_terms(c.logits, c.teacher, c.ids, c.alpha, c.targets, c.teacher_is_logits)
    grad = reference.hybrid_grad(
        c.logits, c.teacher, c.ids, c.alpha, c.targets, g_kl, g_lp, teacher_is_logits=c.teacher_is_logits
    )
    return kl, lp, grad


def assert_matches(case: Case, backend: str, inplace: bool = False, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    n = case.logits.shape[0]
    g_kl, g_lp = torch.randn(n, generator=g) * 1.7, torch.randn(n, generator=g)  # ≠ 1 on purpose
    kl, lp, grad = run_backend(case, backend, g_kl, g_lp, inplace)
    kl_ref, lp_ref, grad_ref = expected(case, g_kl, g_lp)
    tol = TOLERANCES[case.logits.dtype]
    atol, rtol = tol["stat"]
    torch.testing.assert_close(
        kl.double(), kl_ref, atol=atol * max(1.0, kl_ref.abs().max().item()), rtol=rtol
    )
    torch.testing.assert_close(
        lp.double(), lp_ref, atol=atol * max(1.0, lp_ref.abs().max().item()), rtol=rtol
    )
    atol, rtol = tol["grad"]
    torch.testing.assert_close(grad.double(), grad_ref, atol=atol, rtol=rtol)


# --- the maths of the reference -------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3])
def test_reference_prop5_closed_form_equals_autograd(m: int) -> None:
    """Eq. 11 (one teacher) and eq. 14 (α-weighted) equal autograd of the KL, in float64."""
    case = make_case(n=4, v=50, m=m, targets=True)
    z = case.logits.double().requires_grad_()
    kl, lp = reference.hybrid_terms(z, case.teacher, None, case.alpha, case.targets)
    g_kl, g_lp = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    ((kl * g_kl).sum() + (lp * g_lp).sum()).backward()
    closed = reference.hybrid_grad(case.logits, case.teacher, None, case.alpha, case.targets, g_kl, g_lp)
    assert z.grad is not None
    torch.testing.assert_close(z.grad, closed, atol=1e-12, rtol=1e-10)


def test_reference_kl_is_the_textbook_kl() -> None:
    case = make_case(n=3, v=40, targets=False)
    p = torch.softmax(case.logits.double(), -1)
    q = case.teacher.double().exp()
    textbook = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(reference.hybrid_terms(case.logits, case.teacher)[0], textbook)


def test_reference_support_follows_b2_pseudocode() -> None:
    """Appendix B.2 literally: full-row softmax, no renormalisation, zero gradient outside S."""
    case = make_case(n=3, v=60, k=8, targets=False)
    assert case.ids is not None
    z = case.logits.double()
    p_full = torch.softmax(z, -1)
    for row in range(3):
        idx = case.ids[row][case.ids[row] >= 0]
        p = p_full[row, idx]
        lq = case.teacher[row, : len(idx)].double() if row else case.teacher[row, :-1].double()
        kl_approx = (p * (p.log() - lq)).sum()
        grad = torch.zeros(60, dtype=torch.float64)
        grad[idx] = p * (p.log() - lq - kl_approx)
        kl_ref = reference.hybrid_terms(case.logits, case.teacher, case.ids)[0][row]
        grad_ref = reference.hybrid_grad(case.logits, case.teacher, case.ids)[row]
        torch.testing.assert_close(kl_ref, kl_approx)
        torch.testing.assert_close(grad_ref, grad)


# --- backends against the reference ----------------------------------------------------------


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("support", [False, True])
def test_backend_matches_reference(backend: str, dtype: torch.dtype, support: bool) -> None:
    case = make_case(n=6, v=3001, k=33 if support else None, dtype=dtype)
    assert_matches(case, backend)


@pytest.mark.parametrize("support", [False, True])
def test_backend_several_teachers(backend: str, support: bool) -> None:
    case = make_case(n=5, v=1999, k=17 if support else None, m=3)
    assert_matches(case, backend)


@pytest.mark.parametrize("m", [1, 2])
def test_teacher_logits_are_normalised_in_the_kernel(backend: str, m: int) -> None:
    """Raw teacher logits (any per-row offset, −inf for masked vocab) act as their log_softmax."""
    case = make_case(n=5, v=1500, m=m)
    offsets = torch.randn((*case.teacher.shape[:-1], 1), generator=torch.Generator().manual_seed(5)) * 7
    case.teacher = case.teacher + offsets
    case.teacher[..., 0, :4] = float("-inf")
    case.teacher_is_logits = True
    assert_matches(case, backend)
    as_logprobs = torch.log_softmax(case.teacher.double(), -1).float()
    kl_lp = kernels.hybrid_loss(case.logits, as_logprobs, teacher_weights=case.alpha, backend=backend).kl
    kl_t, _, _ = run_backend(case, backend, torch.ones(5), torch.zeros(5))
    torch.testing.assert_close(kl_t, kl_lp.detach(), atol=1e-4, rtol=1e-4)


def test_teacher_logits_need_the_full_vocabulary() -> None:
    case = make_case(n=3, v=100, k=5)
    with pytest.raises(KernelInputError, match="teacher_is_logits"):
        kernels.hybrid_loss(case.logits, case.teacher, case.ids, teacher_is_logits=True)


@pytest.mark.parametrize("support", [False, True])
def test_zero_teacher_weights_leave_only_the_sparse_term(backend: str, support: bool) -> None:
    case = make_case(n=4, v=300, k=5 if support else None, m=2)
    case.alpha = torch.zeros(2, dtype=torch.float64)
    kl, _, _ = run_backend(case, backend, torch.ones(4), torch.ones(4))
    assert (kl == 0).all()
    assert_matches(case, backend)


@pytest.mark.parametrize("support", [False, True])
@pytest.mark.parametrize("targets", [False, True])
def test_backend_inplace_grad_writes_into_logits(backend: str, support: bool, targets: bool) -> None:
    case = make_case(n=4, v=1025, k=9 if support else None, targets=targets)
    assert_matches(case, backend, inplace=True)
    z = case.logits.clone().requires_grad_()
    work = z * 1
    storage = work.data_ptr()
    res = kernels.hybrid_loss(
        work, case.teacher, case.ids, targets=case.targets, inplace_grad=True, backend=backend
    )
    (res.kl.sum() + res.target_logprob.sum()).backward()
    assert z.grad is not None
    torch.testing.assert_close(work.detach(), z.grad)  # the gradient lives in the logits' storage
    assert work.data_ptr() == storage


@pytest.mark.parametrize("v", [1, 7, 4097])
@pytest.mark.parametrize("support", [False, True])
def test_triton_odd_vocab_and_small_blocks(interpret: None, v: int, support: bool) -> None:
    """V not a multiple of the tile and several tiles per row (block_v=64), via the launchers."""
    from kernels import triton_backend

    case = make_case(n=3, v=v, k=min(v, 5) if support else None)
    inp = check_inputs(case.logits, case.teacher, case.ids, None, case.targets)
    g_kl, g_lp = torch.full((3,), 0.5), torch.full((3,), -2.0)
    stats = triton_backend.triton_forward(inp, block_v=64)
    grad = triton_backend.triton_backward(inp, stats, g_kl, g_lp, torch.empty_like(case.logits), 64)
    kl_ref, lp_ref, grad_ref = expected(case, g_kl, g_lp)
    torch.testing.assert_close(stats.kl.double(), kl_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.target_logprob.double(), lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, atol=2e-6, rtol=1e-4)


def test_torch_chunking_does_not_change_results() -> None:
    case = make_case(n=9, v=300, k=None)
    inp = check_inputs(case.logits, case.teacher, None, None, case.targets)
    g = torch.randn(9)
    a, b = torch_forward(inp, chunk_rows=2), torch_forward(inp, chunk_rows=9)
    torch.testing.assert_close(a.kl, b.kl)
    ga = torch_backward(inp, a, g, g, torch.empty_like(case.logits), chunk_rows=4)
    gb = torch_backward(inp, b, g, g, torch.empty_like(case.logits), chunk_rows=9)
    torch.testing.assert_close(ga, gb)


# --- numerical edge cases --------------------------------------------------------------------


@pytest.mark.parametrize("support", [False, True])
def test_teacher_minus_inf_is_clamped_to_the_floor(backend: str, support: bool) -> None:
    case = make_case(n=4, v=513, k=12 if support else None)
    case.teacher[0, :3] = float("-inf")
    case.teacher[2, 5] = float("-inf")
    kl, _, grad = run_backend(case, backend, torch.ones(4), torch.zeros(4))
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    assert kl[0] > 1.0  # a large finite penalty for mass on the forbidden tokens
    assert_matches(case, backend)


def test_student_minus_inf_gives_zero_probability_and_no_nan(backend: str) -> None:
    case = make_case(n=4, v=700, targets=False)
    case.logits[0, ::3] = float("-inf")  # masked vocabulary
    case.logits[3, :] = float("-inf")  # a fully masked row
    kl, _, grad = run_backend(case, backend, torch.ones(4), torch.zeros(4))
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    assert (grad[0, ::3] == 0).all() and (grad[3] == 0).all() and kl[3] == 0
    case.logits[3, :] = 0.0
    assert_matches(case, backend)


@pytest.mark.parametrize("support", [False, True])
def test_huge_logits_stay_accurate(backend: str, support: bool) -> None:
    """|z| around 1e4: shifting by the row max before any subtraction keeps fp32 exact enough."""
    case = make_case(n=4, v=1500, k=20 if support else None, scale=1.0)
    case.logits[:2] += 1.0e4
    case.logits[2:] -= 1.0e4
    case.logits[3, :700] = -1.0e4
    assert_matches(case, backend)


def test_ties_and_flat_rows(backend: str) -> None:
    case = make_case(n=4, v=1000)
    case.logits[0] = 0.25  # a flat row
    case.logits[1, 10:14] = 50.0  # a tie at the top
    case.teacher[2] = torch.log_softmax(case.logits[2].double(), -1).float()  # q = p: KL 0
    kl, _, _ = run_backend(case, backend, torch.ones(4), torch.zeros(4))
    assert abs(kl[2].item()) < 1e-5
    assert_matches(case, backend)


def test_all_masked_rows_give_zero(backend: str) -> None:
    case = make_case(n=4, v=800, k=10, targets=True)
    assert case.ids is not None and case.targets is not None
    case.ids[2] = -1  # every id of the row is padding
    case.targets[2] = -100  # and no sampled token
    kl, lp, grad = run_backend(case, backend, torch.full((4,), 3.0), torch.full((4,), 2.0))
    assert kl[2] == 0 and lp[2] == 0 and (grad[2] == 0).all()
    assert_matches(case, backend)


def test_sparse_term_alone_is_the_policy_gradient(backend: str) -> None:
    """With g_kl = 0 the gradient is A·(onehot(y) − p), the REINFORCE score (Theorem 1)."""
    case = make_case(n=3, v=256)
    assert case.targets is not None
    adv = torch.tensor([0.5, -1.0, 2.0])
    _, lp, grad = run_backend(case, backend, torch.zeros(3), adv)
    p = torch.softmax(case.logits.double(), -1)
    onehot = torch.zeros_like(p)
    onehot[0, case.targets[0]] = onehot[2, case.targets[2]] = 1
    want = (onehot - p) * adv.double().unsqueeze(1)
    want[1] = 0  # targets[1] = -100
    torch.testing.assert_close(grad.double(), want, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(lp[0].double(), p[0, case.targets[0]].log(), atol=1e-5, rtol=1e-5)


def test_forward_saves_only_row_statistics() -> None:
    """No [N, V] temporary is kept for backward: besides the inputs only O(N) tensors are saved."""
    case = make_case(n=8, v=400)
    logits = case.logits.clone().requires_grad_()
    out = kernels.hybrid_loss(logits, case.teacher, targets=case.targets, backend="torch")
    saved = [t for t in out.kl.grad_fn.saved_tensors if t is not None]  # type: ignore[union-attr]
    big = [t for t in saved if t.numel() >= 400]
    assert all(t.data_ptr() in (logits.data_ptr(), case.teacher.data_ptr()) for t in big)
    assert sum(t.numel() for t in saved if t.numel() < 400) <= 8 * 4 + 1


def test_dense_kl_is_hybrid_loss_kl(backend: str) -> None:
    case = make_case(n=3, v=100, k=6, targets=False)
    got = kernels.dense_kl(case.logits, case.teacher, case.ids, backend=backend)
    torch.testing.assert_close(
        got.double(), reference.hybrid_terms(case.logits, case.teacher, case.ids)[0], atol=1e-5, rtol=1e-5
    )


# --- backend choice and bad input -----------------------------------------------------------


def test_auto_backend_is_torch_on_cpu_and_triton_needs_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    with pytest.raises(KernelInputError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"))


BAD_INPUTS = [
    ("logits", lambda c: {"logits": c.logits[0]}),
    ("logits", lambda c: {"logits": c.logits.long()}),
    ("teacher_logprobs", lambda c: {"teacher_logprobs": c.teacher[:, :5]}),
    ("ids", lambda c: {"ids": torch.full((4, 3), 50)}),
    ("ids", lambda c: {"ids": torch.tensor([[1, 1, 2]] * 4), "teacher_logprobs": c.teacher[:, :3]}),
    ("ids", lambda c: {"ids": torch.ones(4, 3), "teacher_logprobs": c.teacher[:, :3]}),
    ("targets", lambda c: {"targets": torch.tensor([0, 1, 2, 50])}),
    ("targets", lambda c: {"targets": torch.zeros(3, dtype=torch.long)}),
    ("teacher_weights", lambda c: {"teacher_weights": [1.0, 2.0]}),
    ("teacher_weights", lambda c: {"teacher_weights": [-1.0]}),
]


@pytest.mark.parametrize(("field", "change"), BAD_INPUTS)
def test_bad_input_names_the_field_and_changes_nothing(field: str, change: object) -> None:
    case = make_case(n=4, v=50)
    before = case.logits.clone()
    kwargs = {"logits": case.logits, "teacher_logprobs": case.teacher, "targets": case.targets}
    kwargs.update(change(case))  # type: ignore[operator]
    with pytest.raises(KernelInputError, match=field):
        kernels.hybrid_loss(backend="torch", **kwargs)  # type: ignore[arg-type]
    assert torch.equal(case.logits, before)


def test_dense_kl_refuses_several_teachers() -> None:
    case = make_case(n=2, v=30, m=2)
    with pytest.raises(KernelInputError, match="teacher_logprobs"):
        kernels.dense_kl(case.logits, case.teacher)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("support", [False, True])
def test_triton_on_gpu_bf16_large_vocab(support: bool) -> None:
    case = make_case(n=4, v=151_936, k=64 if support else None, dtype=torch.bfloat16, targets=True)
    g_kl, g_lp = torch.randn(4) * 1.3, torch.randn(4)
    dev = Case(
        case.logits.cuda(),
        case.teacher.cuda(),
        None if case.ids is None else case.ids.cuda(),
        None,
        None if case.targets is None else case.targets.cuda(),
    )
    kl, lp, grad = run_backend(dev, "triton", g_kl.cuda(), g_lp.cuda())
    kl_ref, lp_ref, grad_ref = expected(case, g_kl, g_lp)
    torch.testing.assert_close(kl.double().cpu(), kl_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lp.double().cpu(), lp_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad.double().cpu(), grad_ref, atol=2e-3, rtol=1.6e-2)
