from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RewardStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REWARD_STATUS_UNSPECIFIED: _ClassVar[RewardStatus]
    REWARD_STATUS_OK: _ClassVar[RewardStatus]
    REWARD_STATUS_ERROR: _ClassVar[RewardStatus]
    REWARD_STATUS_TIMEOUT: _ClassVar[RewardStatus]
    REWARD_STATUS_UNAVAILABLE: _ClassVar[RewardStatus]
REWARD_STATUS_UNSPECIFIED: RewardStatus
REWARD_STATUS_OK: RewardStatus
REWARD_STATUS_ERROR: RewardStatus
REWARD_STATUS_TIMEOUT: RewardStatus
REWARD_STATUS_UNAVAILABLE: RewardStatus

class RewardInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifierDescription(_message.Message):
    __slots__ = ("name", "kind", "reward_names", "required_fields", "description", "timeout_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REWARD_NAMES_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    reward_names: _containers.RepeatedScalarFieldContainer[str]
    required_fields: _containers.RepeatedScalarFieldContainer[str]
    description: str
    timeout_s: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., reward_names: _Optional[_Iterable[str]] = ..., required_fields: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class RewardInfoReply(_message.Message):
    __slots__ = ("api_version", "verifiers")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERIFIERS_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    verifiers: _containers.RepeatedCompositeFieldContainer[VerifierDescription]
    def __init__(self, api_version: _Optional[str] = ..., verifiers: _Optional[_Iterable[_Union[VerifierDescription, _Mapping]]] = ...) -> None: ...

class VerifyItem(_message.Message):
    __slots__ = ("prompt", "response", "reference", "verifiers")
    class ReferenceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    VERIFIERS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    reference: _containers.ScalarMap[str, str]
    verifiers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ..., reference: _Optional[_Mapping[str, str]] = ..., verifiers: _Optional[_Iterable[str]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("items", "timeout_s")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[VerifyItem]
    timeout_s: float
    def __init__(self, items: _Optional[_Iterable[_Union[VerifyItem, _Mapping]]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class Reward(_message.Message):
    __slots__ = ("verifier", "name", "value", "status", "detail")
    VERIFIER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    verifier: str
    name: str
    value: float
    status: RewardStatus
    detail: str
    def __init__(self, verifier: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[float] = ..., status: _Optional[_Union[RewardStatus, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class ItemRewards(_message.Message):
    __slots__ = ("rewards",)
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedCompositeFieldContainer[Reward]
    def __init__(self, rewards: _Optional[_Iterable[_Union[Reward, _Mapping]]] = ...) -> None: ...

class VerifyReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ItemRewards]
    def __init__(self, results: _Optional[_Iterable[_Union[ItemRewards, _Mapping]]] = ...) -> None: ...
