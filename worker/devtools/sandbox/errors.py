"""The error bodies the sandbox answers with: the API's `ApiError` shapes and gateway pages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import orjson

Violation = tuple[str, str]  # (property path, violation message)

_AUTH_DOCS: Final = {
    "name": "API Authentication",
    "url": "https://www.infobip.com/docs/essentials/api-authentication",
}
_SCOPES_DOCS: Final = {
    "name": "API Scopes",
    "url": "https://www.infobip.com/docs/essentials/api-essentials/api-authorization#api-scopes",
}
_THROTTLING_DOCS: Final = {
    "name": "Throttling handling errors",
    "url": "https://www.infobip.com/docs/essentials/integration-best-practices#throttling-handling-errors",
}


def _api_error(
    code: str,
    description: str,
    action: str,
    resources: list[dict[str, str]],
    violations: Iterable[Violation] = (),
) -> bytes:
    return orjson.dumps(
        {
            "errorCode": code,
            "description": description,
            "action": action,
            "violations": [{"property": prop, "violation": text} for prop, text in violations],
            "resources": resources,
        }
    )


def bad_request(violations: Iterable[Violation]) -> bytes:
    """400 E400 with the given violations."""
    return _api_error(
        "E400",
        "Request cannot be processed.",
        "Check the syntax, violations and adjust the request.",
        [],
        violations,
    )


UNAUTHORIZED: Final = _api_error(
    "E401",
    "The request lacks valid authentication credentials for the requested resource.",
    "Check the resources and adjust authentication credentials.",
    [_AUTH_DOCS],
)
FORBIDDEN: Final = _api_error(
    "E403",
    "Insufficient permissions to access the requested resource.",
    "Repeat the request with new or different credentials.",
    [_SCOPES_DOCS],
)
TOO_MANY_REQUESTS: Final = _api_error(
    "E429",
    "Too many requests sent.",
    "Check request rate limit specified in the API endpoint documentation resource.",
    [_THROTTLING_DOCS],
)
INTERNAL_ERROR: Final = _api_error("E500", "Something went wrong.", "Contact the support.", [])
# Not documented by the vendor; same shape so a client that parses ApiError keeps working.
NOT_FOUND: Final = _api_error("E404", "Requested resource not found.", "Check the request path.", [])
METHOD_NOT_ALLOWED: Final = _api_error("E405", "Method not allowed.", "Check the request method.", [])

# 502/503/504 come from the provider's edge, not from the API itself, so they are HTML pages:
# a client must cope with a non-JSON error body there.
_GATEWAY_REASONS: Final = {
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
}


def gateway_page(status: int) -> bytes:
    """The HTML page an edge proxy answers with for 502/503/504."""
    title = f"{status} {_GATEWAY_REASONS[status]}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


# The html_body fault: a 200 from something between the client and the API (a proxy's or a
# captive portal's page) while the request did reach the API and was accepted.
PROXY_PAGE: Final = (
    b"<!DOCTYPE html>\r\n<html>\r\n<head><title>Request received</title></head>\r\n<body>\r\n"
    b"<h1>Request received</h1>\r\n<p>Your request has been forwarded.</p>\r\n</body>\r\n</html>\r\n"
)
