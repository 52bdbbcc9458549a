"""JSON schemas for the structured-output tests: nested objects, arrays, enums, required/optional
fields, numbers with bounds, strings with patterns and lengths. Strings and arrays carry upper bounds
and objects are closed (``additionalProperties: false``, as OpenAI's strict mode requires) where a
small model could otherwise run on until max_tokens (the output would be cut, not invalid)."""

from __future__ import annotations

NAME = {"type": "string", "maxLength": 24}


def closed(schema):
    """``schema`` with ``additionalProperties: false`` on every object that does not say otherwise."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in ("items", "anyOf", "$defs") else v for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: closed(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if "$defs" in out:
        out["$defs"] = {k: closed(v) for k, v in schema["$defs"].items()}
    return out


_SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"city": NAME, "country": NAME}, "required": ["city"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["score"]},
    {"type": "object", "properties": {"count": {"type": "integer", "minimum": 10, "maximum": 99}},
     "required": ["count"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                               "minItems": 1, "maxItems": 4}}, "required": ["tags"]},
    {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "maxItems": 5}},
     "required": ["values"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                                                                                 "name": NAME},
                                               "required": ["id", "name"]}}, "required": ["user"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "boolean"}}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}, "label": NAME},
        "required": ["id"]}}}, "required": ["items"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 5},
    {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 4},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "integer", "exclusiveMinimum": 0, "maximum": 100},
    {"type": "boolean"},
    {"type": "object", "properties": {"title": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                      "rating": {"type": "number", "minimum": 0, "maximum": 10}},
     "required": ["title", "year", "rating"], "additionalProperties": False},
    {"type": "object", "properties": {"first": NAME, "middle": NAME, "last": NAME},
     "required": ["first", "last"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"enum": ["active", "inactive"]}, "since": {
        "type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}, "required": ["status", "since"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "number", "minimum": -10, "maximum": 10}}, "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.(com|org)$"}},
     "required": ["email"]},
    {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "string", "maxLength": 8}]}},
     "required": ["id"]},
    {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 20}}, "required": ["note"]},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]},
                                      "label": {"const": "fixed"}}, "required": ["level", "label"]},
    {"type": "object", "properties": {"person": {"$ref": "#/$defs/person"}}, "required": ["person"],
     "$defs": {"person": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 120}},
                          "required": ["name"]}}},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60},
                                      "unit": {"enum": ["C", "F"]}}, "required": ["temperature", "unit"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 8,
                                               "pattern": "^[a-z]+$"}}, "required": ["word"]},
    {"type": "object", "properties": {"steps": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
                                         "done": {"type": "boolean"}}, "required": ["n", "done"]}}},
     "required": ["steps"]},
    {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                      "lon": {"type": "number", "minimum": -180, "maximum": 180},
                                      "name": NAME}, "required": ["lat", "lon"]},
]
SCHEMAS: list[dict] = [closed(s) for s in _SCHEMAS]
