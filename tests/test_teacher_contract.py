"""Contract suite of the teacher service, run against every backend available on the machine.

Each backend is served by a real ``python -m services.teacher`` process on loopback with a tiny
random Llama saved to a temp dir; its numbers are compared with an in-process float32 forward pass
of the hf scorer on the same weights. ``hf`` runs everywhere; ``vllm`` only with ``-m gpu`` where
vLLM is importable and CUDA is present (there the comparison is RELIABILITY item 19: hf and vllm
agree on a fixed prompt set). Covers RELIABILITY 17 (fuzz) and 18 (fingerprint at scoring).

Run: ``.venv/bin/pytest tests/test_teacher_contract.py -q`` (add ``-m gpu`` on a GPU machine).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc import aio

from contracts.tensors import encode
from proto.distill.v1 import teacher_pb2, teacher_pb2_grpc
from services.teacher.client import FingerprintMismatch, TeacherClient, make_item
from services.teacher.domain import ItemScores, ScoreItem, ScoreParams
from services.teacher.fingerprint import fingerprint
from services.teacher.hf_backend import HFConfig, HFScorer, load_hf
from services.teacher.tiny_model import TinySpec, build_tiny_model
from tests.procs import ServiceProcess, free_port, health_status, wait_serving

pytestmark = pytest.mark.integration
VOCAB, MAX_LEN, MAX_TOP_K = 300, 64, 32
SERVICE = "distill.v1.TeacherScoring"


@dataclass(frozen=True)
class Flavor:
    backend: str
    args: tuple[str, ...]  # extra server arguments
    atol: float  # against the float32 CPU reference
    exact_ids: bool  # top-K ids identical (same kernels as the reference)


FLAVORS = {
    "hf-cpu": Flavor("hf", ("--device", "cpu", "--dtype", "float32"), 2e-5, True),
    "hf-cuda": Flavor("hf", ("--device", "cuda", "--dtype", "float32"), 1e-4, False),
    # vLLM's dtype "auto" serves a float32 checkpoint in float16, so it sits further from the reference.
    "vllm": Flavor("vllm", (), 5e-2, False),
}


@dataclass
class Teacher:
    flavor: Flavor
    address: str
    proc: ServiceProcess
    model_dir: Path

    @property
    def backend(self) -> str:
        return self.flavor.backend


def _available(name: str) -> bool:
    if name == "hf-cpu":
        return True
    return torch.cuda.is_available() and (name != "vllm" or importlib.util.find_spec("vllm") is not None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("teacher"),
        # head_dim 64: a size every vLLM attention kernel takes
        # One position more than served: vLLM needs room for the token it generates.
        TinySpec(vocab_size=VOCAB, hidden_size=64, num_heads=1, max_length=MAX_LEN + 1),
    )


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> HFScorer:
    return load_hf(HFConfig(model=str(model_dir), device="cpu", dtype="float32", max_top_k=MAX_TOP_K))


@pytest.fixture(
    scope="module",
    params=[
        "hf-cpu",
        pytest.param("hf-cuda", marks=pytest.mark.gpu),
        pytest.param("vllm", marks=pytest.mark.gpu),
    ],
)
def teacher(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Teacher]:
    name: str = request.param
    if not _available(name):
        pytest.skip(f"{name} cannot run on this machine")
    model_dir: Path = request.getfixturevalue("model_dir")  # built only where it will be served
    flavor = FLAVORS[name]
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    args = ["--model", str(model_dir), "--backend", flavor.backend, "--port", str(port)]
    args += ["--max-top-k", str(MAX_TOP_K), "--max-length", str(MAX_LEN), "--grace-s", "2", *flavor.args]
    proc = ServiceProcess("services.teacher", args, log)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(proc, address, SERVICE, timeout=300 if flavor.backend == "vllm" else 60)
        yield Teacher(flavor, address, proc, model_dir)
    finally:
        assert proc.stop() == 0, proc.log()


def _items(seed: int, n: int = 6, candidates: int = 0) -> list[ScoreItem]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(2, MAX_LEN + 1))
        start = int(rng.integers(1, length))
        cands = rng.integers(0, VOCAB, (length - start, candidates)) if candidates else None
        out.append(make_item(rng.integers(0, VOCAB, length), start, cands))
    return out


def _assert_close(got: ItemScores, ref: ItemScores, atol: float, exact_ids: bool) -> None:
    np.testing.assert_allclose(got.token_logprobs, ref.token_logprobs, atol=atol)
    np.testing.assert_allclose(got.top_logprobs, ref.top_logprobs, atol=atol)
    np.testing.assert_allclose(got.outside_mass, ref.outside_mass, atol=atol)
    np.testing.assert_allclose(got.candidate_logprobs, ref.candidate_logprobs, atol=atol)
    if exact_ids:
        assert np.array_equal(got.top_ids, ref.top_ids)


async def test_info_describes_the_model(teacher: Teacher) -> None:
    from transformers import AutoTokenizer

    async with TeacherClient([teacher.address], deadline_s=10) as client:
        info = await client.info()
    assert (info.vocab_size, info.max_sequence_length, info.backend) == (VOCAB, MAX_LEN, teacher.backend)
    assert info.tokenizer_fingerprint == fingerprint(AutoTokenizer.from_pretrained(teacher.model_dir))
    assert info.max_top_k == MAX_TOP_K
    assert info.candidate_scoring == (teacher.backend == "hf")


async def test_reflection_lists_the_service(teacher: Teacher) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with aio.insecure_channel(teacher.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=10)]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("top_k", [0, 1, 10, MAX_TOP_K])
async def test_scores_equal_an_in_process_forward_pass(
    teacher: Teacher, reference: HFScorer, top_k: int
) -> None:
    items = _items(seed=top_k)
    params = ScoreParams(top_k=top_k)
    async with TeacherClient([teacher.address], deadline_s=30) as client:
        got = await client.score(items, top_k=top_k)
    for it, g in zip(items, got, strict=True):
        (ref,) = reference.score_batch([(it, params)])
        _assert_close(g, ref, teacher.flavor.atol, teacher.flavor.exact_ids)
        assert g.top_logprobs.shape == (it.num_positions, top_k)
        assert np.all(np.diff(g.top_logprobs, axis=1) <= 0), "top-K must come best first"
        np.testing.assert_allclose(np.exp(g.top_logprobs).sum(1) + g.outside_mass, 1.0, atol=1e-4)


async def test_candidate_ids_are_scored_or_refused(teacher: Teacher, reference: HFScorer) -> None:
    items = _items(seed=7, candidates=5)
    async with TeacherClient([teacher.address], deadline_s=30) as client:
        if teacher.backend != "hf":
            with pytest.raises(aio.AioRpcError) as err:
                await client.score(items, top_k=4)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "candidate" in (err.value.details() or "")
            return
        got = await client.score(items, top_k=4, temperature=0.7)
    for it, g in zip(items, got, strict=True):
        (ref,) = reference.score_batch([(it, ScoreParams(top_k=4, temperature=0.7))])
        _assert_close(g, ref, teacher.flavor.atol, teacher.flavor.exact_ids)
        assert g.candidate_logprobs.shape == it.candidate_ids.shape


async def test_float16_reply_is_close_to_float32(teacher: Teacher) -> None:
    items = _items(seed=3)
    async with TeacherClient([teacher.address], deadline_s=30) as client:
        f32, f16 = await asyncio.gather(client.score(items, 8), client.score(items, 8, dtype="float16"))
    for a, b in zip(f32, f16, strict=True):
        np.testing.assert_allclose(
            b.top_logprobs, a.top_logprobs, rtol=2e-3, atol=max(2e-3, teacher.flavor.atol)
        )
        assert np.array_equal(a.top_ids, b.top_ids) or not teacher.flavor.exact_ids


async def test_concurrent_requests_get_their_own_answers(teacher: Teacher) -> None:
    batches = [_items(seed=100 + i, n=3) for i in range(12)]
    async with TeacherClient([teacher.address], deadline_s=30) as client:
        together = await asyncio.gather(*(client.score(b, top_k=5) for b in batches))
        alone = [await client.score(b, top_k=5) for b in batches]
    for t_batch, a_batch in zip(together, alone, strict=True):
        for t, a in zip(t_batch, a_batch, strict=True):
            _assert_close(t, a, max(1e-5, teacher.flavor.atol), teacher.flavor.exact_ids)


def _seq(ids: bytes | list[int], start: int = 1, cands: bytes = b"") -> teacher_pb2.ScoreSequence:
    raw = ids if isinstance(ids, bytes) else encode(np.array(ids), "int32")
    return teacher_pb2.ScoreSequence(token_ids=raw, response_start=start, candidate_ids=cands)


FUZZ = {
    "id_minus_one": (dict(sequences=[_seq([1, -1])]), "sequences[0].token_ids[1]"),
    "id_equal_vocab": (dict(sequences=[_seq([1, VOCAB])]), "sequences[0].token_ids[1]"),
    "id_two_pow_31": (
        dict(sequences=[_seq(b"\x01\x00\x00\x00\x00\x00\x00\x80")]),
        "sequences[0].token_ids[1]",
    ),
    "empty_sequence": (dict(sequences=[_seq([])]), "sequences[0].token_ids"),
    "empty_batch": (dict(sequences=[]), "sequences"),
    "max_len_plus_one": (dict(sequences=[_seq([1] * (MAX_LEN + 1))]), "sequences[0].token_ids"),
    "start_zero": (dict(sequences=[_seq([1, 2], start=0)]), "sequences[0].response_start"),
    "start_past_end": (dict(sequences=[_seq([1, 2], start=2)]), "sequences[0].response_start"),
    "top_k_over_cap": (dict(sequences=[_seq([1, 2])], top_k=MAX_TOP_K + 1), "top_k"),
    "ragged_ids_bytes": (dict(sequences=[_seq(b"\x01\x00\x00\x00\x02\x00")]), "sequences[0].token_ids"),
    "candidates_short": (
        dict(sequences=[_seq([1, 2, 3], cands=b"\x00" * 12)], num_candidates=2),
        "sequences[0].candidate_ids",
    ),
    "candidate_out_of_vocab": (
        dict(sequences=[_seq([1, 2], cands=encode([VOCAB], "int32"))], num_candidates=1),
        "sequences[0].candidate_ids[0][0]",
    ),
    "temperature_nan": (dict(sequences=[_seq([1, 2])], temperature=float("nan")), "temperature"),
    "temperature_inf": (dict(sequences=[_seq([1, 2])], temperature=float("inf")), "temperature"),
    "dtype_unknown": (dict(sequences=[_seq([1, 2])], logprob_dtype=9), "logprob_dtype"),
}
CAPABILITY_FIELDS = {"candidates_short", "candidate_out_of_vocab"}  # FAILED_PRECONDITION where unsupported


@pytest.mark.parametrize("case", list(FUZZ))
async def test_bad_input_names_the_field_and_the_server_keeps_serving(teacher: Teacher, case: str) -> None:
    fields, field = FUZZ[case]
    async with aio.insecure_channel(teacher.address) as channel:
        stub = teacher_pb2_grpc.TeacherScoringStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Score(teacher_pb2.ScoreRequest(**fields), timeout=10)  # type: ignore[arg-type]
        ok = await stub.Score(teacher_pb2.ScoreRequest(sequences=[_seq([1] * MAX_LEN)], top_k=3), timeout=10)
    if teacher.backend != "hf" and case in CAPABILITY_FIELDS:
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    else:
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert (err.value.details() or "").startswith(field + ":"), err.value.details()
    assert ok.scores[0].num_positions == MAX_LEN - 1  # max_len itself is accepted
    assert health_status(teacher.address, SERVICE) == "SERVING"


async def test_tokenizer_fingerprint_mismatch_is_refused(teacher: Teacher, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    other_dir = build_tiny_model(tmp_path / "other", TinySpec(vocab_size=VOCAB, tokenizer_salt="x"))
    other = fingerprint(AutoTokenizer.from_pretrained(other_dir))
    async with TeacherClient([teacher.address], deadline_s=10) as client:
        own = (await client.info()).tokenizer_fingerprint
        assert other != own
        await client.check_fingerprint(own)
        with pytest.raises(FingerprintMismatch, match="expects"):
            await client.check_fingerprint(other)  # registration
        with pytest.raises(aio.AioRpcError) as err:
            await client.score(_items(seed=1, n=1), top_k=2, expected_fingerprint=other)  # scoring
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "expected_tokenizer_fingerprint" in (err.value.details() or "")
        await client.score(_items(seed=1, n=1), top_k=2, expected_fingerprint=own)
