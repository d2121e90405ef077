"""The two ways a request ends without an answer. Each becomes an HTTP status and an OpenAI-shaped
error body (api.py): the client's mistake (BadRequest, a 4xx naming what is wrong) or the cluster's
failure to serve a valid request (RequestFailed, a 5xx)."""

from __future__ import annotations


class BadRequest(ValueError):
    """A client mistake: answered with `status` (400 unless said) and this message, OpenAI-shaped."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class RequestFailed(RuntimeError):
    """The cluster could not serve a valid request: answered with `status` and this message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
