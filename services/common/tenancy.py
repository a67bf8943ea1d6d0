"""Who is calling: the gateway authenticates users and vouches for the owner (DESIGN.md, Auth).

Services behind the gateway accept a request only with the internal token, and take the owner
from `X-Crucible-Owner`. Everything a service stores is scoped by that owner.
"""

from __future__ import annotations

import hmac
import re
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from services.common.errors import AuthenticationFailed

OWNER_HEADER = "x-crucible-owner"
# Owners are key owners (the gateway's own pattern): safe in paths, logs and filter expressions.
OWNER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")


async def internal_only(request: Request) -> None:
    """The caller holds the internal token (the app keeps it in `state.internal_token`)."""
    token: SecretStr = request.app.state.internal_token
    expected = b"Bearer " + token.get_secret_value().encode()
    got = request.headers.get("authorization", "").encode("latin-1")
    if not hmac.compare_digest(got, expected):
        raise AuthenticationFailed("this service is reached through the gateway")


async def current_owner(request: Request) -> str:
    """The owner the gateway vouches for."""
    await internal_only(request)
    who = request.headers.get(OWNER_HEADER, "")
    if not OWNER_RE.fullmatch(who):
        raise AuthenticationFailed("missing or malformed owner")
    return who


Owner = Annotated[str, Depends(current_owner)]


def internal_headers(token: SecretStr, owner: str) -> dict[str, str]:
    """Headers for one service calling another on behalf of `owner`."""
    return {"authorization": f"Bearer {token.get_secret_value()}", OWNER_HEADER: owner}
