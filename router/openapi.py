"""The request bodies in ``/openapi.json``: endpoints read their own bodies (``validation.read_request``:
timeout, size and nesting limits, OpenAI-shaped 400s), so FastAPI cannot see them; this declares each
POST route's body model, and the OpenAI error body of its 4xx/5xx answers, so schema tools see the real
API (and can fuzz it).
"""

from __future__ import annotations

from typing import Mapping

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .openai_protocol import ErrorResponse

_REF = "#/components/schemas/{model}"
_ERRORS = {"400": "a bad request (param names the field)", "401": "a missing or wrong API key",
           "408": "the body did not arrive in time", "413": "the body is too large",
           "429": "the router's queue is full (Retry-After)", "503": "no worker can serve it now (Retry-After)"}


def declare_request_bodies(app: FastAPI, bodies: Mapping[str, type[BaseModel]]) -> None:
    """``bodies``: POST path -> its request model. Replaces ``app.openapi`` (the schema is built once)."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (*bodies.values(), ErrorResponse):
            body = model.model_json_schema(ref_template=_REF)
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        error = {"content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}}
        for path, model in bodies.items():
            op = schema["paths"][path]["post"]
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}
            op["responses"].update({code: {"description": why, **error} for code, why in _ERRORS.items()})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
