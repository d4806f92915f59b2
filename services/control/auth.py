"""Bearer-token check for every state-changing route (a router-level dependency).

The token comes from settings (``DISTILL_API_TOKEN``); ``settings.check_secure`` has already
refused to start without a strong one unless in dev mode. Reads stay open.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.control.errors import Unauthorized
from services.control.settings import ControlSettings, get_settings

bearer = HTTPBearer(auto_error=False, description="DISTILL_API_TOKEN of the control plane")


async def require_token(
    settings: Annotated[ControlSettings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Unauthorized (401 with ``WWW-Authenticate: Bearer``) on a missing or wrong token."""
    if credentials is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <DISTILL_API_TOKEN>'")
    expected = settings.token().encode()
    # compare_digest: the time taken does not reveal where the tokens differ.
    if not expected or not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise Unauthorized("wrong bearer token")
