"""``GET /openapi.json``: the endpoint's OpenAPI 3.1 document, its input schema built from the request's one field
table (:data:`..request_fields.FIELDS`: names, kinds, defaults, ranges, tooltips, aliases) and the size presets
(:mod:`..sizes`), so it says what the validation does; the output and queue shapes are fal's, as :mod:`.app` and
:mod:`.protocol` answer them. Public (no key), as fal's own schema pages are.
"""

from __future__ import annotations

from ..endpoint import ENDPOINT, ENDPOINT_BASE
from ..request_fields import FIELDS, NUM_TRAIN_TIMESTEPS
from ..sizes import IMAGE_SIZE_PRESETS, MAX_SIDE, MIN_SIDE
from .fal_headers import NO_RETRY_HEADER, PRIORITIES, PRIORITY_HEADER, TIMEOUT_HEADER, TIMEOUT_TYPE_HEADER

REF = "#/components/schemas/"


def field_schema(f) -> dict:
    """One field's JSON Schema, from its row."""
    kinds = {"text": {"type": "string"}, "switch": {"type": "boolean"},
             "image": {"type": "string", "description": "an http(s) URL or a data: URI"},
             "number": {"type": "number"}, "whole": {"type": "integer"},
             "choice": {"type": "string", "enum": list(f.choices)},
             "loras": {"type": "array", "items": {"$ref": REF + "LoraWeight"}},
             "size": {"anyOf": [{"type": "string", "enum": [*IMAGE_SIZE_PRESETS, "none"]},
                                {"$ref": REF + "ImageSize"}, {"type": "null"}]},
             "timesteps": {"anyOf": [{"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                   "maximum": NUM_TRAIN_TIMESTEPS - 1}},
                                     {"type": "string"}]}}
    schema = {"title": f.name.replace("_", " ").title(), **kinds[f.kind]}
    text = f.tooltip + (f" Also accepted as '{f.alias}'." if f.alias else "")
    schema["description"] = text if "description" not in schema else f"{text} ({schema['description']})"
    if f.low is not None:
        schema["exclusiveMinimum" if f.low_open else "minimum"] = f.low
        schema["maximum"] = f.high
    if f.default is not None:
        schema["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
    if not f.fal:
        schema["x-local-only"] = True  # this server's extension: fal's endpoint refuses it
    return schema


def input_schema() -> dict:
    return {"title": "Input", "type": "object", "properties": {f.name: field_schema(f) for f in FIELDS},
            "required": [f.name for f in FIELDS if f.required]}


SCHEMAS = {
    "ImageSize": {"type": "object", "required": ["width", "height"], "additionalProperties": False, "properties": {
        side: {"type": "integer", "minimum": MIN_SIDE, "maximum": MAX_SIDE} for side in ("width", "height")}},
    "LoraWeight": {"type": "object", "required": ["path"], "properties": {
        "path": {"type": "string", "description": "a LoRA this server may load (see the README)"},
        "scale": {"type": "number", "default": 1.0}}},
    "Image": {"type": "object", "required": ["url", "width", "height", "content_type"], "properties": {
        "url": {"type": "string"}, "width": {"type": "integer"}, "height": {"type": "integer"},
        "content_type": {"type": "string"}}},
    "Output": {"title": "Output", "type": "object",
               "required": ["images", "seed", "has_nsfw_concepts", "prompt", "timings"], "properties": {
                   "images": {"type": "array", "items": {"$ref": REF + "Image"}},
                   "seed": {"type": "integer"}, "has_nsfw_concepts": {"type": "array", "items": {"type": "boolean"}},
                   "prompt": {"type": "string"}, "expanded_prompt": {"type": "string"},
                   "timings": {"type": "object", "additionalProperties": {"type": "number"}}}},
    "QueueStatus": {"type": "object", "required": ["status", "request_id"], "properties": {
        "status": {"type": "string", "enum": ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]},
        "request_id": {"type": "string"}, "status_url": {"type": "string"}, "response_url": {"type": "string"},
        "cancel_url": {"type": "string"}, "queue_position": {"type": "integer"},
        "gateway_request_id": {"type": "string"},
        "logs": {"anyOf": [{"type": "array", "items": {"type": "object"}}, {"type": "null"}]},
        "metrics": {"type": "object"}, "error": {"type": "string"}, "error_type": {"type": "string"}}},
    "Error": {"type": "object", "required": ["detail"], "properties": {"detail": {"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "object", "required": ["loc", "msg", "type"],
                                                          "properties": {"loc": {"type": "array"},
                                                                         "msg": {"type": "string"},
                                                                         "type": {"type": "string"}}}}]}}},
}


def _answer(description: str, schema: str | None = None, media: str = "application/json") -> dict:
    out = {"description": description}
    if schema:
        out["content"] = {media: {"schema": {"$ref": REF + schema}}}
    return out


def _errors(*codes) -> dict:
    return {str(code): _answer(f"HTTP {code} in fal's error shape", "Error") for code in codes}


def document(base: str, keyed: bool) -> dict:
    """The OpenAPI document for a server reached at ``base``; ``keyed``: the server has a key."""
    rid = {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
    public = {"security": []}
    submit_params = [
        {"name": TIMEOUT_HEADER, "in": "header", "schema": {"type": "number", "exclusiveMinimum": 0},
         "description": "seconds the request may wait before it starts; then 504 with "
                        f"{TIMEOUT_TYPE_HEADER}: user"},
        {"name": PRIORITY_HEADER, "in": "header", "schema": {"type": "string", "enum": list(PRIORITIES)}},
        {"name": NO_RETRY_HEADER, "in": "header", "schema": {"type": "string"}},
        {"name": "fal_webhook", "in": "query", "schema": {"type": "string", "format": "uri"},
         "description": "a URL the outcome is POSTed to, signed as fal signs (keys: /.well-known/jwks.json)"}]
    body = {"required": True, "content": {"application/json": {"schema": {"$ref": REF + "Input"}}}}
    paths = {
        f"/{ENDPOINT}": {"post": {"summary": "Submit a request to the queue", "parameters": submit_params,
                                  "requestBody": body,
                                  "responses": {"200": _answer("queued", "QueueStatus"),
                                                **_errors(401, 413, 422, 429, 503, 507)}}},
        f"/run/{ENDPOINT}": {"post": {"summary": "Run a request and wait for its result",
                                      "parameters": submit_params[:1], "requestBody": body,
                                      "responses": {"200": _answer("the result", "Output"),
                                                    **_errors(401, 422, 429, 503, 504)}}},
        f"/{ENDPOINT_BASE}/requests/{{request_id}}/status": {"get": {
            "summary": "A request's status", "parameters": [rid, {"name": "logs", "in": "query",
                                                                  "schema": {"type": "string"}}],
            "responses": {"200": _answer("its status", "QueueStatus"), **_errors(401, 404)}}},
        f"/{ENDPOINT_BASE}/requests/{{request_id}}": {"get": {
            "summary": "A finished request's result", "parameters": [rid],
            "responses": {"200": _answer("the result", "Output"), **_errors(400, 401, 404, 422, 500, 504)}}},
        f"/{ENDPOINT_BASE}/requests/{{request_id}}/cancel": {"put": {
            "summary": "Cancel a request", "parameters": [rid],
            "responses": {"202": _answer("cancelled, or asked to stop"), **_errors(400, 401, 404)}}},
        "/health": {"get": {"summary": "200 while the server answers", **public,
                            "responses": {"200": _answer("up")}}},
        "/ready": {"get": {"summary": "200 while requests are taken and run, else 503 with why", **public,
                           "responses": {"200": _answer("ready"), "503": _answer("not ready")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text format)",
                             "responses": {"200": _answer("the metrics"), **_errors(401)}}},
        "/openapi.json": {"get": {"summary": "This document", **public, "responses": {"200": _answer("it")}}},
        "/.well-known/jwks.json": {"get": {"summary": "The public key webhooks are signed with (JWKS)", **public,
                                           "responses": {"200": _answer("the keys")}}},
    }
    doc = {"openapi": "3.1.0",
           "info": {"title": ENDPOINT, "version": "1.0.0",
                    "description": f"fal's queue API for {ENDPOINT}, served on your own GPU"},
           "servers": [{"url": base}], "paths": paths,
           "components": {"schemas": {"Input": input_schema(), **SCHEMAS}}}
    if keyed:
        doc["components"]["securitySchemes"] = {"falKey": {
            "type": "apiKey", "in": "header", "name": "Authorization",
            "description": "'Key <the server's key>', as fal's clients send FAL_KEY"}}
        doc["security"] = [{"falKey": []}]
    else:
        for item in paths.values():
            for op in item.values():
                op.pop("security", None)
    return doc
