"""One error tree, translated at the edges (HTTP status in api/, ApplicationError in activities)."""

from __future__ import annotations


class SigngateError(Exception):
    """Base error: carries the contract's error code and the HTTP status it maps to."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(self, description: str, *, code: str | None = None) -> None:
        super().__init__(description)
        self.description = description
        if code is not None:
            self.code = code


class BadRequest(SigngateError):
    status_code = 400
    code = "bad_request"


class PolicyViolation(BadRequest):
    code = "policy_violation"


class Unauthorized(SigngateError):
    status_code = 401
    code = "unauthorized"


class Forbidden(SigngateError):
    status_code = 403
    code = "forbidden"


class NotEligible(Forbidden):
    code = "not_eligible"


class ApprovalRequired(Forbidden):
    code = "approval_required"


class NotFound(SigngateError):
    status_code = 404
    code = "not_found"


class Conflict(SigngateError):
    status_code = 409
    code = "conflict"


class RequestNotOpen(Conflict):
    code = "request_not_open"


class Unavailable(SigngateError):
    status_code = 503
    code = "unavailable"
