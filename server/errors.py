"""The one error type of the serving layer, rendered in OpenAI's error shape.

Every 4xx/5xx a client sees, from a worker or the gateway, is
`{"error": {"message", "type", "param", "code"}}`: raised as APIError, or translated here from
FastAPI's validation errors, malformed JSON, unknown routes and unexpected exceptions (no traceback
ever reaches the body).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("server")


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code, self.message, self.type, self.param, self.code = status_code, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def not_found(what: str, param: str | None = "model") -> APIError:
    return APIError(404, what, type="not_found_error", param=param, code="model_not_found" if param == "model" else None)


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="overloaded", headers={"Retry-After": str(retry_after_s)})


def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    not_an_object = tuple(first.get("loc", ())) == ("body",) and first.get("type") in ("model_attributes_type", "dict_type", "missing")
    if first.get("type") == "json_invalid" or not_an_object:  # missing: an empty or `null` body
        return APIError(400, "request body must be a JSON object", code="invalid_json").response()
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(400, message, param=param, code="invalid_value").response()


def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    return APIError(exc.status_code, str(exc.detail), type=kind).response()


def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return APIError(500, f"internal error ({type(exc).__name__})", type="server_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, lambda _r, e: e.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
