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
