"""Request and response bodies of the REST API (``Create`` in, ``Public`` out), pydantic only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts.runspec import Name, RunSpec
from contracts.runstate import Desired, RunStatus
from contracts.schedules import ScheduleSpec

# host:port, host being a name, IPv4 or [IPv6]; the port 1..65535 is checked by the validator.
Address = Annotated[str, Field(max_length=255, pattern=r"^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$")]
# ASCII only: an internationalised host must come IDNA-encoded (xn--...), as HTTP sends it.
HttpUrl = Annotated[str, Field(max_length=2048, pattern=r"^https?://[A-Za-z0-9._~%:@\[\]-]+(/[!-~]*)?$")]


def _check_port(address: str) -> str:
    port = int(address.rsplit(":", 1)[1])
    if not 1 <= port <= 65535:
        raise ValueError(f"address: port {port} is not in 1..65535")
    return address


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """RFC 9457 problem details; ``errors`` lists the fields of a 422."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class TeacherCreate(_Body):
    name: Name
    address: Address  # the teacher's gRPC host:port
    weight: Annotated[float, Field(ge=0.0, le=1e3, allow_inf_nan=False)] = 1.0  # default α for CLIs

    @model_validator(mode="after")
    def _port(self) -> TeacherCreate:
        _check_port(self.address)
        return self


class TeacherPublic(BaseModel):
    name: str
    address: str
    weight: float
    model_name: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_sequence_length: int
    backend: str
    registered_at: float


class VerifierCreate(_Body):
    name: Name  # for builtin verifiers, the reward service's verifier name
    kind: Literal["builtin", "grpc", "http"]
    address: Address | None = None  # grpc verifiers
    url: HttpUrl | None = None  # http verifiers
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _target(self) -> VerifierCreate:
        if self.kind == "grpc" and self.address is None:
            raise ValueError("address: a grpc verifier needs an address (host:port)")
        if self.kind == "http" and self.url is None:
            raise ValueError("url: an http verifier needs a url")
        if self.kind != "grpc" and self.address is not None:
            raise ValueError(f"address: only grpc verifiers take an address, this one is {self.kind}")
        if self.kind != "http" and self.url is not None:
            raise ValueError(f"url: only http verifiers take a url, this one is {self.kind}")
        if self.address is not None:
            _check_port(self.address)
        return self


class VerifierPublic(BaseModel):
    name: str
    kind: str
    address: str | None
    url: str | None
    options: dict[str, Any]
    registered_at: float


class RunCreated(BaseModel):
    id: str
    status: RunStatus


class MetricsPoint(BaseModel):
    id: str  # stream entry id; pass it as ``since`` to read what follows
    step: int | None
    values: dict[str, float | None]


class MetricsSeries(BaseModel):
    run_id: str
    points: list[MetricsPoint]
    next: str | None  # ``since`` for the next page; None when this page was the last


class RunSummary(BaseModel):
    id: str
    name: str
    status: RunStatus
    desired: Desired
    step: int
    created_at: float
    updated_at: float
    started_at: float  # when a learner began training the run (its model loaded); 0 until then


class RunPublic(RunSummary):
    spec: RunSpec
    error: str
    tokenizer_fingerprint: str
    lambdas: dict[str, float]  # λ per reward at the current step
    schedules: dict[str, dict[str, Any]]  # ScheduleTimeline.to_dict() per reward
    latest_metrics: MetricsPoint | None


class RunList(BaseModel):
    runs: list[RunSummary]
    next_cursor: str | None  # pass as ``cursor`` for the next page


class ScheduleUpdate(_Body):
    schedules: Annotated[dict[Name, ScheduleSpec], Field(min_length=1)]  # reward name → new λ schedule


class ScheduleChange(BaseModel):
    run_id: str
    step_from: int  # the first step the new schedules apply to
    schedules: dict[str, dict[str, Any]]  # the updated timelines


class Health(BaseModel):
    status: Literal["ok"]
