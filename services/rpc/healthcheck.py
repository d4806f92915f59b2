"""Probe a gRPC server's standard health service: ``python -m services.rpc.healthcheck HOST:PORT``.

Exit status 0 when the server reports SERVING, 1 otherwise (NOT_SERVING, unreachable, deadline
passed), so container orchestrators can use it as a healthcheck command without a downloaded
``grpc_health_probe`` binary. Health stays open on token-protected servers (see ``auth.py``), so
the probe needs no secret; with ``--tls-ca`` it speaks TLS to a server started with a certificate.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(address: str, tls_ca: Path | None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
    return grpc.secure_channel(address, creds)


def check(address: str, service: str = "", timeout_s: float = 3.0, tls_ca: Path | None = None) -> str:
    """The health status name of ``service`` at ``address``: SERVING, NOT_SERVING, ... or the
    gRPC status code name (e.g. UNAVAILABLE, DEADLINE_EXCEEDED) when the call itself failed."""
    with _channel(address, tls_ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            return code.name if code is not None else "UNKNOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m services.rpc.healthcheck", description=__doc__.splitlines()[0]
    )
    p.add_argument("address", help="host:port of the gRPC server")
    p.add_argument("--service", default="", help="service name to check (default: the whole server)")
    p.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the Check call")
    p.add_argument("--tls-ca", type=Path, help="PEM root certificate: probe over TLS")
    a = p.parse_args(argv)
    if a.timeout_s <= 0:
        p.error(f"--timeout-s: must be > 0, got {a.timeout_s}")
    status = check(a.address, a.service, a.timeout_s, a.tls_ca)
    # One line on stderr: `docker inspect` shows it in the health log.
    sys.stderr.write(f"{a.address} {a.service or '(server)'}: {status}\n")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
