"""Control-plane settings (pydantic-settings, env prefix ``DISTILL_``), built behind a cached dependency.

Nothing here runs at import: ``get_settings()`` reads the environment the first time a request
(or ``__main__``) needs it; tests build ``ControlSettings(...)`` directly and pass it to
``create_app``. ``check_secure()`` refuses a missing or default API token outside dev mode.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# The token dev mode falls back to; the CLI uses it too when DISTILL_TOKEN is unset.
DEV_TOKEN = "distill-dev-token"
# Tokens that must never guard a real deployment.
_WEAK_TOKENS = frozenset({"", DEV_TOKEN, "changeme", "change-me", "secret", "token", "password", "dev"})
MIN_TOKEN_LENGTH = 16


class InsecureSettings(ValueError):
    """The service would start with no token or a default one outside dev mode."""


class ControlSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Redis of the platform (DISTILL_REDIS_URL or REDIS_URL); unset: an embedded redis-server in data_dir.
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DISTILL_REDIS_URL", "redis_url")
    )
    data_dir: Path = Path("runs/control")
    api_token: SecretStr | None = None  # bearer token for every state-changing route
    dev: bool = False  # allow the default dev token (never in a deployment)
    teacher_token: SecretStr | None = None  # bearer token the teachers' gRPC servers expect
    reward_address: str | None = None  # reward service host:port; checks builtin verifier names
    reward_token: SecretStr | None = None
    rpc_timeout_s: float = Field(default=5.0, gt=0, le=120)  # deadline of Info/health/reachability
    redis_timeout_s: float = Field(default=2.0, gt=0, le=60)  # per Redis command; readyz fails after it
    metrics_max_runs: int = Field(default=50, ge=1, le=10_000)  # bounds /metrics label cardinality

    def token(self) -> str:
        """The API token in force (the dev token in dev mode when none is set)."""
        if self.api_token is not None:
            return self.api_token.get_secret_value()
        return DEV_TOKEN if self.dev else ""

    def check_secure(self) -> None:
        """:class:`InsecureSettings` unless a strong token is set or dev mode is explicit."""
        if self.dev:
            return
        token = self.token()
        if token in _WEAK_TOKENS or len(token) < MIN_TOKEN_LENGTH:
            raise InsecureSettings(
                "DISTILL_API_TOKEN: set a secret of at least "
                f"{MIN_TOKEN_LENGTH} characters (not a default), or start with --dev for local use"
            )


@lru_cache(maxsize=1)
def get_settings() -> ControlSettings:
    """Settings from the environment, read once (the FastAPI dependency)."""
    return ControlSettings()
