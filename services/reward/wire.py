"""Translation between ``distill.v1`` reward messages and the domain types (both directions)."""

from __future__ import annotations

from collections.abc import Sequence

from proto.distill.v1 import reward_pb2 as pb
from services.reward.domain import Item, Reward, Status, VerifierInfo

API_VERSION = "distill.v1"
_STATUS_TO_PB = {
    Status.OK: pb.REWARD_STATUS_OK,
    Status.ERROR: pb.REWARD_STATUS_ERROR,
    Status.TIMEOUT: pb.REWARD_STATUS_TIMEOUT,
    Status.UNAVAILABLE: pb.REWARD_STATUS_UNAVAILABLE,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


def item_to_pb(item: Item) -> pb.VerifyItem:
    return pb.VerifyItem(
        prompt=item.prompt,
        response=item.response,
        reference=dict(item.reference),
        verifiers=list(item.verifiers),
    )


def item_from_pb(msg: pb.VerifyItem) -> Item:
    return Item(msg.prompt, msg.response, dict(msg.reference), tuple(msg.verifiers))


def reward_to_pb(reward: Reward) -> pb.Reward:
    return pb.Reward(
        verifier=reward.verifier,
        name=reward.name,
        value=reward.value,
        status=_STATUS_TO_PB[reward.status],
        detail=reward.detail,
    )


def reward_from_pb(msg: pb.Reward) -> Reward:
    # An unspecified status from a peer is an error, never an OK value.
    status = _STATUS_FROM_PB.get(msg.status, Status.ERROR)
    return Reward(msg.verifier, msg.name, msg.value, status, msg.detail)


def reply_to_pb(results: Sequence[Sequence[Reward]]) -> pb.VerifyReply:
    return pb.VerifyReply(results=[pb.ItemRewards(rewards=[reward_to_pb(r) for r in rs]) for rs in results])


def reply_from_pb(msg: pb.VerifyReply) -> list[list[Reward]]:
    return [[reward_from_pb(r) for r in item.rewards] for item in msg.results]


def info_to_pb(infos: Sequence[VerifierInfo]) -> pb.RewardInfoReply:
    return pb.RewardInfoReply(
        api_version=API_VERSION,
        verifiers=[
            pb.VerifierDescription(
                name=i.name,
                kind=i.kind,
                reward_names=list(i.reward_names),
                required_fields=list(i.required_fields),
                description=i.description,
                timeout_s=i.timeout_s,
            )
            for i in infos
        ],
    )


def info_from_pb(msg: pb.RewardInfoReply) -> list[VerifierInfo]:
    return [
        VerifierInfo(
            d.name, d.kind, tuple(d.reward_names), tuple(d.required_fields), d.description, {}, d.timeout_s
        )
        for d in msg.verifiers
    ]
