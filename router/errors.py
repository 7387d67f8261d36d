"""Errors a request can end with, each with its HTTP status and TGI ``error_type``."""

from __future__ import annotations


class InferError(Exception):
    status: int = 500
    error_type: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        """TGI's error body."""
        return {"error": self.message, "error_type": self.error_type}


class ValidationError(InferError):
    """Bad input from the user; the message names the field (``param`` when it is known)."""

    status = 422
    error_type = "validation"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(f"Input validation error: {message}")
        self.detail = message
        self.param = param


class ContextLengthError(ValidationError):
    """A prompt (plus the tokens asked for) longer than the server allows; the message has both numbers."""

    code = "context_length_exceeded"


class OverloadedError(InferError):
    status = 429
    error_type = "overloaded"

    def __init__(self, message: str = "Model is overloaded") -> None:
        super().__init__(message)


class GenerationError(InferError):
    """A shard failed the step this request was part of."""

    status = 424
    error_type = "generation"


class IncompleteGenerationError(InferError):
    status = 500
    error_type = "incomplete_generation"


class UnhealthyError(InferError):
    status = 503
    error_type = "healthcheck"


class AuthenticationError(InferError):
    """No API key, or the wrong one, on a route that needs it."""

    status = 401
    error_type = "authentication"


class PayloadTooLargeError(InferError):
    """A request body over ``--payload-limit``; the message names the limit."""

    status = 413
    error_type = "payload_too_large"

    def __init__(self, limit: int, size: int | None = None) -> None:
        given = f" Given: {size} bytes" if size is not None else ""
        super().__init__(f"the request body is larger than this server's limit of {limit} bytes.{given}")
        self.limit = limit
