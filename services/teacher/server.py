"""The ``TeacherScoring`` gRPC servicer and the process entry point.

The servicer only translates wire ↔ domain: validation turns a request into domain items,
a ``TeacherBackend`` scores them, ``wire`` packs the reply, and domain errors become status
codes here and nowhere else. Run: ``python -m services.teacher --model PATH --port 50051``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from grpc import aio

from proto.distill.v1 import teacher_pb2, teacher_pb2_grpc
from services.rpc.server import ServiceSpec, serve
from services.teacher.backend import BatchedBackend, Scorer, TeacherBackend
from services.teacher.config import TeacherSettings, parse_args
from services.teacher.domain import InvalidRequest, NotReady, TeacherError, TooLarge, Unsupported
from services.teacher.validation import parse_score_request
from services.teacher.wire import encode_reply, info_to_wire, reply_bytes

log = logging.getLogger(__name__)
SERVICE_NAME = teacher_pb2.DESCRIPTOR.services_by_name["TeacherScoring"].full_name

_STATUS = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
}


class TeacherServicer(teacher_pb2_grpc.TeacherScoringServicer):
    def __init__(self, max_message_bytes: int) -> None:
        self.backend: TeacherBackend | None = None  # set once the model is loaded
        self.max_message_bytes = max_message_bytes

    def _ready(self) -> TeacherBackend:
        if self.backend is None:
            raise NotReady("the teacher model is still loading")
        return self.backend

    async def Info(
        self, request: teacher_pb2.InfoRequest, context: aio.ServicerContext
    ) -> teacher_pb2.InfoReply:
        try:
            return info_to_wire(self._ready().info, self.max_message_bytes)
        except TeacherError as err:
            await _abort(context, err)
            raise

    async def Score(
        self, request: teacher_pb2.ScoreRequest, context: aio.ServicerContext
    ) -> teacher_pb2.ScoreReply:
        try:
            backend = self._ready()
            parsed = parse_score_request(request, backend.info)
            size = reply_bytes(
                [it.num_positions for it in parsed.items],
                parsed.params.top_k,
                request.num_candidates,
                parsed.dtype,
            )
            if size > self.max_message_bytes:
                raise TooLarge(
                    f"reply would be {size} bytes, over this server's message limit of "
                    f"{self.max_message_bytes}: send fewer sequences per request (the teacher client splits "
                    "batches), a smaller top_k or fewer candidates"
                )
            log.debug(
                "scoring %d sequences (%d tokens), top_k=%d",
                len(parsed.items),
                sum(it.token_ids.shape[0] for it in parsed.items),
                parsed.params.top_k,
            )
            scores = await backend.score(parsed.items, parsed.params)
            return encode_reply(scores, parsed.params, parsed.dtype, request.num_candidates)
        except TeacherError as err:
            await _abort(context, err)
            raise


async def _abort(context: aio.ServicerContext, err: TeacherError) -> None:
    code = next((c for kind, c in _STATUS.items() if isinstance(err, kind)), grpc.StatusCode.INTERNAL)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        log.info("refused: %s", err)
    await context.abort(code, str(err))


def load_scorer(settings: TeacherSettings) -> Scorer:
    """Load the configured backend's model (blocking: imports torch or vLLM and reads weights)."""
    if settings.backend == "vllm":
        from services.teacher.vllm_backend import VLLMConfig, load_vllm

        vcfg = VLLMConfig(
            model=settings.model,
            tokenizer=settings.tokenizer,
            model_name=settings.model_name,
            dtype=settings.dtype,
            max_batch_tokens=settings.max_batch_tokens,
            max_top_k=settings.max_top_k,
            max_length=settings.max_length,
        )
        return load_vllm(vcfg)
    from services.teacher.hf_backend import HFConfig, load_hf

    hcfg = HFConfig(
        model=settings.model,
        tokenizer=settings.tokenizer,
        model_name=settings.model_name,
        device=settings.device,
        dtype=settings.dtype,
        max_batch_tokens=settings.max_batch_tokens,
        max_top_k=settings.max_top_k,
        max_length=settings.max_length,
    )
    return load_hf(hcfg)


async def run(settings: TeacherSettings) -> None:
    """Serve until SIGTERM: NOT_SERVING while the model loads, then SERVING, then drain."""
    servicer = TeacherServicer(settings.max_message_bytes)
    spec = ServiceSpec(
        SERVICE_NAME, lambda s: teacher_pb2_grpc.add_TeacherScoringServicer_to_server(servicer, s)
    )

    async def load() -> None:
        scorer = await asyncio.to_thread(load_scorer, settings)
        # The batcher lives on the event loop, so it is built here rather than in the thread.
        servicer.backend = BatchedBackend(scorer, max_wait_s=settings.batch_wait_ms / 1000.0)
        log.info("loaded %s", scorer.info)

    async def stop() -> None:
        if servicer.backend is not None:
            await servicer.backend.close()

    await serve([spec], settings.server_options(), load, stop)


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("services").setLevel(settings.log_level.upper())  # ours only, not grpc's or torch's
    asyncio.run(run(settings))
