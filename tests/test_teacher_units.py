"""Unit tests of the teacher service's pure parts: tensor codec, validation, wire sizes, batching,
fingerprint, and the hf scorer's padded batches against unpadded forward passes (in-process).

Run: ``.venv/bin/pytest tests/test_teacher_units.py -q``
"""

from __future__ import annotations

import asyncio
import copy
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from contracts.tensors import TensorDecodeError, decode, decode_vector, encode
from proto.distill.v1 import teacher_pb2
from services.teacher import hf_backend
from services.teacher.backend import BatchedBackend
from services.teacher.batching import DynamicBatcher
from services.teacher.client import make_item, split_by_bytes
from services.teacher.domain import InvalidRequest, ScoreParams, TeacherInfo, Unsupported
from services.teacher.fingerprint import fingerprint
from services.teacher.hf_backend import HFConfig, HFScorer, load_hf, score_positions
from services.teacher.tiny_model import TinySpec, build_tiny_model
from services.teacher.validation import parse_score_request
from services.teacher.wire import decode_reply, encode_reply, encode_request, reply_bytes

INFO = TeacherInfo(
    model_name="t",
    vocab_size=100,
    tokenizer_fingerprint="sha256:abc",
    max_sequence_length=16,
    backend="hf",
    candidate_scoring=True,
    temperature_scaling=True,
    max_top_k=8,
    max_batch_tokens=64,
)


# --- tensor codec -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int32", "float16", "float32"])
def test_codec_round_trip_is_little_endian(dtype: str) -> None:
    arr = np.arange(12).reshape(3, 4) - 5
    data = encode(arr, dtype)  # type: ignore[arg-type]
    assert len(data) == arr.size * np.dtype(dtype).itemsize
    wire = np.dtype(dtype).newbyteorder("<")
    assert np.array_equal(np.frombuffer(data, wire).reshape(3, 4), arr)
    assert np.array_equal(decode(data, dtype, (3, 4), "x"), arr)  # type: ignore[arg-type]


def test_codec_refuses_wrong_lengths_and_overflow() -> None:
    with pytest.raises(TensorDecodeError, match=r"^ids: 7 bytes"):
        decode(b"\x00" * 7, "int32", (2,), "ids")
    with pytest.raises(TensorDecodeError, match="multiple of 4"):
        decode_vector(b"\x00" * 6, "int32", "ids")
    with pytest.raises(OverflowError):
        encode(np.array([2**31]), "int32")
    assert decode(encode(np.array([-1e6, np.inf]), "float16"), "float16", (2,), "f")[0] == -65504.0


# --- validation -------------------------------------------------------------------------------
def _request(
    ids: list[int] | bytes, start: int = 1, cands: bytes = b"", **kw: Any
) -> teacher_pb2.ScoreRequest:
    raw = ids if isinstance(ids, bytes) else encode(np.array(ids), "int32")
    seq = teacher_pb2.ScoreSequence(token_ids=raw, response_start=start, candidate_ids=cands)
    return teacher_pb2.ScoreRequest(sequences=[seq], **kw)


BAD = [
    (_request([1, -1, 3]), "sequences[0].token_ids[1]"),
    (_request([1, 100]), "sequences[0].token_ids[1]"),
    (
        _request(encode(np.array([1], np.int64).view(np.int32), "int32")[:4] + b"\x00\x00\x00\x80"),
        "sequences[0].token_ids[1]",
    ),  # 2**31 read as int32
    (_request([]), "sequences[0].token_ids"),
    (_request([1] * 17), "sequences[0].token_ids"),
    (_request([1, 2], start=0), "sequences[0].response_start"),
    (_request([1, 2], start=2), "sequences[0].response_start"),
    (_request(b"\x01\x00\x00\x00\x02"), "sequences[0].token_ids"),
    (_request([1, 2, 3], top_k=9), "top_k"),
    (_request([1, 2, 3], temperature=float("nan")), "temperature"),
    (_request([1, 2, 3], temperature=0.0), "temperature"),
    (_request([1, 2, 3], num_candidates=2, cands=b"\x00" * 12), "sequences[0].candidate_ids"),
    (
        _request([1, 2, 3], num_candidates=1, cands=encode(np.array([5, 100]), "int32")),
        "sequences[0].candidate_ids[1][0]",
    ),
    (teacher_pb2.ScoreRequest(), "sequences"),
    (_request([1, 2], logprob_dtype=7), "logprob_dtype"),
]


@pytest.mark.parametrize(("request_", "field"), BAD)
def test_validation_names_the_bad_field(request_: teacher_pb2.ScoreRequest, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_score_request(request_, INFO)
    assert err.value.field == field, str(err.value)


def test_validation_accepts_edges_and_reads_candidates() -> None:
    cands = np.arange(15 * 3).reshape(15, 3) % 100
    parsed = parse_score_request(
        _request(list(range(16)), num_candidates=3, cands=encode(cands, "int32"), top_k=8), INFO
    )
    (item,) = parsed.items
    assert item.num_positions == 15 and np.array_equal(item.candidate_ids, cands)
    assert parsed.params == ScoreParams(top_k=8, temperature=1.0) and parsed.dtype == "float32"


def test_validation_fingerprint_and_capabilities() -> None:
    with pytest.raises(Unsupported, match="expected_tokenizer_fingerprint"):
        parse_score_request(_request([1, 2], expected_tokenizer_fingerprint="sha256:other"), INFO)
    no_cands = TeacherInfo(**{**INFO.__dict__, "candidate_scoring": False, "temperature_scaling": False})
    with pytest.raises(Unsupported, match="num_candidates"):
        parse_score_request(_request([1, 2], num_candidates=1, cands=encode([3], "int32")), no_cands)
    with pytest.raises(Unsupported, match="temperature"):
        parse_score_request(_request([1, 2], temperature=0.5), no_cands)


# --- wire -------------------------------------------------------------------------------------
def test_reply_round_trip_and_size_estimate() -> None:
    rng = np.random.default_rng(0)
    items = [make_item(rng.integers(0, 100, n), 2, rng.integers(0, 100, (n - 2, 3))) for n in (5, 9)]
    params = ScoreParams(top_k=4)
    request = encode_request(items, params, "float16")
    parsed = parse_score_request(request, INFO)
    assert [p.num_positions for p in parsed.items] == [3, 7]
    from services.teacher.domain import ItemScores

    scores = [
        ItemScores(
            token_logprobs=-rng.random(p).astype(np.float32),
            top_ids=rng.integers(0, 100, (p, 4)).astype(np.int32),
            top_logprobs=-rng.random((p, 4)).astype(np.float32),
            candidate_logprobs=-rng.random((p, 3)).astype(np.float32),
            outside_mass=rng.random(p).astype(np.float32),
        )
        for p in (3, 7)
    ]
    reply = encode_reply(scores, params, "float16", 3)
    assert reply.ByteSize() <= reply_bytes([3, 7], 4, 3, "float16")
    back = decode_reply(teacher_pb2.ScoreReply.FromString(reply.SerializeToString()), items)
    for a, b in zip(scores, back, strict=True):
        assert np.array_equal(a.top_ids, b.top_ids)
        np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, atol=1e-3)


def test_split_by_bytes_keeps_order_and_budget() -> None:
    items = [make_item(np.zeros(n, np.int32), 1) for n in (50, 50, 200, 10, 10)]
    chunks = split_by_bytes(items, top_k=4, dtype="float32", budget=2100)
    assert [len(c) for c in chunks] == [1, 1, 1, 2]  # 200-long item alone (over budget by itself)
    assert [it for c in chunks for it in c] == items
    for c in chunks[:2] + chunks[3:]:
        assert reply_bytes([it.num_positions for it in c], 4, 0, "float32") <= 2100


# --- fingerprint ------------------------------------------------------------------------------
class _Tok:
    def __init__(self, vocab: dict[str, int], special: list[str]) -> None:
        self._vocab, self.all_special_tokens = vocab, special

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)


def test_fingerprint_depends_on_vocab_ids_and_specials_not_order() -> None:
    base = fingerprint(_Tok({"a": 0, "b": 1}, ["a"]))
    assert base == fingerprint(_Tok({"b": 1, "a": 0}, ["a"]))
    assert base != fingerprint(_Tok({"a": 1, "b": 0}, ["a"]))
    assert base != fingerprint(_Tok({"a": 0, "b": 1}, ["b"]))
    assert base.startswith("sha256:") and len(base) == 7 + 64


# --- batching ---------------------------------------------------------------------------------
async def test_batcher_gathers_concurrent_work_within_budget() -> None:
    batches: list[list[int]] = []
    thread_names: set[str] = set()

    def run(batch: list[int]) -> list[int]:
        batches.append(list(batch))
        thread_names.add(threading.current_thread().name)
        return [w * 10 for w in batch]

    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        run, tokens=lambda w: w, token_budget=12, max_wait_s=0.01
    )
    batcher.start()
    results = await asyncio.gather(*(batcher.submit([w]) for w in (3, 3, 3, 3, 5, 20)))
    await batcher.close()
    assert [r[0] for r in results] == [30, 30, 30, 30, 50, 200]
    for b in batches:  # padded size within budget, except a single over-long item alone
        assert len(b) == 1 or max(b) * len(b) <= 12
    assert len(batches) < 6 and [w for b in batches for w in b] == [3, 3, 3, 3, 5, 20]
    assert all(n.startswith("teacher-forward") for n in thread_names)


async def test_batcher_skips_cancelled_work_and_propagates_errors() -> None:
    ran: list[int] = []
    gate = threading.Event()

    def run(batch: list[int]) -> list[int]:
        gate.wait(5)
        ran.extend(batch)
        if -1 in batch:
            raise RuntimeError("boom")
        return batch

    batcher: DynamicBatcher[int, int] = DynamicBatcher(run, tokens=lambda w: 1, token_budget=1, max_wait_s=0)
    batcher.start()
    first = asyncio.create_task(batcher.submit([1]))
    await asyncio.sleep(0.05)  # 1 is running (blocked on the gate); 2 waits in the queue
    second = asyncio.create_task(batcher.submit([2]))
    await asyncio.sleep(0.05)
    second.cancel()
    gate.set()
    assert await first == [1]
    with pytest.raises(RuntimeError, match="boom"):
        await batcher.submit([-1])
    await batcher.close()
    assert ran == [1, -1]


# --- hf scorer in-process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> HFScorer:
    path = build_tiny_model(tmp_path_factory.mktemp("tiny"), TinySpec(vocab_size=300, max_length=64))
    return load_hf(HFConfig(model=str(Path(path)), device="cpu", dtype="float32", max_top_k=50))


def test_hf_padded_batch_equals_single_forward(scorer: HFScorer) -> None:
    rng = np.random.default_rng(1)
    items = [
        make_item(rng.integers(0, 300, n), s, rng.integers(0, 300, (n - s, 5)))
        for n, s in ((4, 1), (33, 20), (64, 2), (10, 9))
    ]
    params = ScoreParams(top_k=7, temperature=0.8)
    batched = scorer.score_batch([(it, params) for it in items])
    for it, got in zip(items, batched, strict=True):
        with torch.no_grad():
            logits = scorer.model(torch.as_tensor(it.token_ids)[None]).logits[0]  # (L, V)
        ref = torch.log_softmax(logits.double() / 0.8, -1)[it.response_start - 1 : -1]  # (P, V)
        targets = torch.as_tensor(it.token_ids[it.response_start :])
        np.testing.assert_allclose(got.token_logprobs, ref.gather(1, targets[:, None])[:, 0], atol=2e-5)
        np.testing.assert_allclose(got.top_logprobs, ref.topk(7, -1).values, atol=2e-5)
        np.testing.assert_allclose(
            got.candidate_logprobs, ref.gather(1, torch.as_tensor(it.candidate_ids)), atol=2e-5
        )
        mass = 1 - ref.topk(7, -1).values.exp().sum(-1)
        np.testing.assert_allclose(got.outside_mass, mass, atol=2e-6)
        single = score_positions(logits[it.response_start - 1 : -1], it, params)
        assert np.array_equal(single.top_ids, got.top_ids)
        assert math.isclose(
            float(np.exp(got.top_logprobs).sum(-1)[0] + got.outside_mass[0]), 1.0, abs_tol=1e-5
        )


@pytest.mark.parametrize(
    ("device", "atol"), [("cpu", 2e-5), pytest.param("cuda", 1e-4, marks=pytest.mark.gpu)]
)
def test_responses_sharing_a_prompt_compute_it_once_and_score_as_alone(
    scorer: HFScorer, monkeypatch: pytest.MonkeyPatch, device: str, atol: float
) -> None:
    if device != "cpu":  # a copy: the module's scorer stays on the CPU for the other tests
        scorer = HFScorer(copy.deepcopy(scorer.model).to(device), scorer.info)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 300, n) for n in (12, 5)]
    items = [  # K = 3 and 2 responses of mixed lengths (one of one token) to two prompts, one alone
        make_item(np.concatenate([p, rng.integers(0, 300, r)]), len(p), rng.integers(0, 300, (r, 4)))
        for p, r in ((prompts[0], 7), (prompts[0], 1), (prompts[0], 20), (prompts[1], 3), (prompts[1], 9))
    ] + [make_item(rng.integers(0, 300, 30), 17, rng.integers(0, 300, (13, 4)))]
    calls: list[tuple[Any, ...]] = []
    shared = hf_backend.shared_prompt.response_logits

    def spy(*args: Any) -> torch.Tensor:
        calls.append(args)
        return shared(*args)

    monkeypatch.setattr(hf_backend.shared_prompt, "response_logits", spy)
    params = ScoreParams(top_k=7, temperature=0.8)
    got = scorer.score_batch([(it, params) for it in items])
    assert len(calls) == 1 and calls[0][1].shape[0] == len(items)  # one pass, every row
    for it, g in zip(items, got, strict=True):
        with torch.no_grad():
            logits = scorer.model(torch.as_tensor(it.token_ids)[None].to(device)).logits[0].cpu()  # (L, V)
        ref = torch.log_softmax(logits.double() / 0.8, -1)[it.response_start - 1 : -1]  # (P, V)
        targets = torch.as_tensor(it.token_ids[it.response_start :])
        np.testing.assert_allclose(g.token_logprobs, ref.gather(1, targets[:, None])[:, 0], atol=atol)
        np.testing.assert_allclose(g.top_logprobs, ref.topk(7, -1).values, atol=atol)
        if device == "cpu":  # elsewhere near-ties may order differently
            assert np.array_equal(g.top_ids, ref.topk(7, -1).indices.numpy())
        np.testing.assert_allclose(
            g.candidate_logprobs, ref.gather(1, torch.as_tensor(it.candidate_ids)), atol=atol
        )
        np.testing.assert_allclose(g.outside_mass, 1 - ref.topk(7, -1).values.exp().sum(-1), atol=atol / 10)


def test_make_item_checks_types_and_int32_range() -> None:
    item = make_item([1, 2, 3], 1)
    assert item.token_ids.dtype == np.int32 and item.candidate_ids.shape == (2, 0)
    with pytest.raises(ValueError, match=r"^token_ids: values outside the int32 range"):
        make_item([1, 2**31], 1)
    with pytest.raises(ValueError, match=r"^candidate_ids: need a 2-D integer array"):
        make_item([1, 2, 3], 1, [1.5, 2.5])


async def test_concurrent_requests_share_forward_passes(scorer: HFScorer) -> None:
    backend = BatchedBackend(scorer, max_wait_s=0.05)
    rng = np.random.default_rng(2)
    requests = [[make_item(rng.integers(0, 300, 20), 5)] for _ in range(8)]
    params = ScoreParams(top_k=3)
    try:
        together = await asyncio.gather(*(backend.score(r, params) for r in requests))
    finally:
        await backend.close()
    assert backend.batcher.batches_run < len(requests)  # 8 × 20 tokens fit one 8192-token budget
    for r, (got,) in zip(requests, together, strict=True):
        (alone,) = scorer.score_batch([(r[0], params)])
        np.testing.assert_allclose(got.token_logprobs, alone.token_logprobs, atol=1e-5)
        assert np.array_equal(got.top_ids, alone.top_ids)


# --- vllm backend's conversion (vLLM itself needs a GPU: its output objects are imitated) -----
@dataclass
class _Logprob:  # the fields of vllm.sequence.Logprob that the backend reads
    logprob: float
    rank: int


def test_vllm_prompt_logprobs_become_scores() -> None:
    from services.teacher.vllm_backend import _scores

    ids = np.array([5, 7, 9], np.int32)
    # Position 0 has no log-prob; each dict holds the top-2 by rank plus the actual token.
    prompt_logprobs = [
        None,
        {3: _Logprob(-0.5, 1), 4: _Logprob(-1.5, 2), 7: _Logprob(-4.0, 9)},
        {9: _Logprob(-0.2, 1), 1: _Logprob(-2.0, 2)},
    ]
    got = _scores(prompt_logprobs, make_item(ids, 1), top_k=2)
    np.testing.assert_allclose(got.token_logprobs, [-4.0, -0.2])
    assert got.top_ids.tolist() == [[3, 4], [9, 1]]
    np.testing.assert_allclose(got.top_logprobs, [[-0.5, -1.5], [-0.2, -2.0]])
    expected = 1 - np.exp([[-0.5, -1.5], [-0.2, -2.0]]).sum(1)
    np.testing.assert_allclose(got.outside_mass, expected, rtol=1e-6)
    assert got.candidate_logprobs.shape == (2, 0)


@pytest.mark.parametrize(
    "argv",
    [["--port", "70000"], ["--tls-cert", "c.pem"], ["--dtype", "int8"], ["--max-batch-tokens", "0"]],
)
def test_bad_command_lines_exit_with_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from services.teacher.config import parse_args

    with pytest.raises(SystemExit) as done:
        parse_args(["--model", "m", *argv])
    assert done.value.code == 2
    assert "error:" in capsys.readouterr().err
