"""Command line and settings of ``python -m services.teacher`` (pydantic at the edge).

The bearer token comes from ``--token`` or, better (command lines are visible to other users),
the ``DISTILL_TEACHER_TOKEN`` environment variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from services.rpc.server import ServerOptions

TOKEN_ENV = "DISTILL_TEACHER_TOKEN"


class TeacherSettings(BaseModel):
    model: str = Field(min_length=1, description="local path or hub name of the teacher")
    backend: Literal["hf", "vllm"] = "hf"
    tokenizer: str | None = None
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_tokens: int = Field(8192, ge=1)
    max_top_k: int = Field(256, ge=0)
    max_length: int | None = Field(None, ge=2)
    batch_wait_ms: float = Field(0.0, ge=0.0, le=1000.0)  # extra wait of a batch that is not full
    grace_s: float = Field(10.0, ge=0.0)
    max_message_mb: float = Field(64.0, gt=0.0, le=2047.0)  # gRPC caps messages below 2 GiB
    # level of the services.* loggers; debug logs every request
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _tls_pair(self) -> TeacherSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    def server_options(self) -> ServerOptions:
        return ServerOptions(
            host=self.host,
            port=self.port,
            token=self.token,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            grace_s=self.grace_s,
            max_message_bytes=self.max_message_bytes,
        )


def parse_args(argv: Sequence[str] | None = None) -> TeacherSettings:
    p = argparse.ArgumentParser(prog="python -m services.teacher", description="Serve a teacher over gRPC.")
    p.add_argument("--model", required=True, help="local path or hub name")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--tokenizer", help="tokenizer path or name (default: the model's)")
    p.add_argument("--model-name", help="name reported by Info (default: last part of --model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=50051)
    # An empty variable (compose's ${VAR:-}) means no token, not the empty token.
    env_token = os.environ.get(TOKEN_ENV) or None
    p.add_argument("--token", default=env_token, help=f"bearer token (or ${TOKEN_ENV})")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain; with --tls-key serves TLS only")
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--device", default="auto", help="hf: cpu, cuda, cuda:1, ... (auto: cuda if present)")
    p.add_argument(
        "--dtype", default="auto", help="auto (bf16 on GPU, f32 on CPU), float32, bfloat16, float16"
    )
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    p.add_argument("--max-top-k", type=int, default=256, help="cap on a request's top_k")
    p.add_argument("--max-length", type=int, help="cap on sequence length (default: the model's)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="how long a batch that is not full waits for company (requests arriving during a forward "
        "pass share the next one anyway)",
    )
    p.add_argument("--grace-s", type=float, default=10.0, help="in-flight calls' time to finish on SIGTERM")
    p.add_argument("--max-message-mb", type=float, default=64.0, help="largest gRPC message in or out")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    try:
        return TeacherSettings(**given)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in err.errors()
        )
        p.error(problems)  # exits with status 2 and the usage line
        raise  # unreachable: error() exits
