"""gRPC servicer of ``distill.v1.RewardService``: translates wire ↔ domain, maps errors to statuses."""

from __future__ import annotations

import logging

import grpc
from grpc import aio

from proto.distill.v1 import reward_pb2 as pb
from proto.distill.v1 import reward_pb2_grpc as pb_grpc
from services.reward.engine import RewardEngine
from services.reward.errors import InvalidRequestError
from services.reward.wire import info_to_pb, item_from_pb, reply_to_pb

log = logging.getLogger(__name__)
SERVICE_NAME = "distill.v1.RewardService"
REPLY_MARGIN_S = 0.05  # leave the reply time to travel before the caller's deadline


class RewardServicer(pb_grpc.RewardServiceServicer):
    def __init__(self, engine: RewardEngine) -> None:
        self.engine = engine

    async def Info(self, request: pb.RewardInfoRequest, context: aio.ServicerContext) -> pb.RewardInfoReply:
        return info_to_pb(self.engine.verifiers.infos())

    async def Verify(self, request: pb.VerifyRequest, context: aio.ServicerContext) -> pb.VerifyReply:
        items = [item_from_pb(m) for m in request.items]
        budget = request.timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            # The caller's deadline bounds the batch: items still running get TIMEOUT, in time.
            cap = max(remaining - REPLY_MARGIN_S, 1e-3)
            budget = min(budget, cap) if budget > 0 else min(self.engine.default_timeout_s, cap)
        try:
            results = await self.engine.verify(items, budget)
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return reply_to_pb(results)
