"""Bearer-token checking shared by the agent's and the controller's HTTP APIs.

One implementation, so both APIs accept and refuse exactly the same headers: the scheme
is case-insensitive (RFC 7235), the token is compared in constant time, and an empty
token never matches.
"""

from __future__ import annotations

import hmac


def bearer_ok(authorization: str, token: bytes) -> bool:
    """True when an `Authorization` header value carries exactly `token`.

    >>> bearer_ok("Bearer s3cret", b"s3cret"), bearer_ok("bearer s3cret ", b"s3cret")
    (True, True)
    >>> bearer_ok("Basic s3cret", b"s3cret"), bearer_ok("Bearer ", b""), bearer_ok("", b"x")
    (False, False, False)
    """
    scheme, _, credentials = authorization.partition(" ")
    given = credentials.strip().encode()
    return scheme.lower() == "bearer" and bool(given) and hmac.compare_digest(given, token)
