"""Twenty varied JSON schemas, each with one valid instance, for structured-output tests and bench.

They cover what clients send in practice (OpenAI's structured-output guide, vLLM's and SGLang's
tests): nested objects, arrays with bounds, enums, const, anyOf, $ref/$defs, recursion, string
formats and patterns, numeric ranges, optional properties and additionalProperties.
"""

from __future__ import annotations

SCHEMAS: list[tuple[str, dict, object]] = [
    ("flat", {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}, {"name": "Ada", "age": 36}),
    ("boolean", {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                 "additionalProperties": False}, {"ok": True}),
    ("enum", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
              "required": ["color"], "additionalProperties": False}, {"color": "green"}),
    ("const", {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "number"}},
               "required": ["kind", "x"], "additionalProperties": False}, {"kind": "point", "x": 1.5}),
    ("string-array", {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                      "minItems": 1, "maxItems": 3}}, "required": ["tags"], "additionalProperties": False},
     {"tags": ["a", "b"]}),
    ("top-array", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}, [1, 2, 3]),
    ("nested", {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "email": {"type": "string"}}, "required": ["id", "email"],
        "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
     {"user": {"id": 7, "email": "a@b.c"}}),
    ("integer-range", {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}},
                       "required": ["score"], "additionalProperties": False}, {"score": 4}),
    ("number-range", {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}},
                      "required": ["p"], "additionalProperties": False}, {"p": 0.25}),
    ("string-length", {"type": "object", "properties": {"code": {"type": "string", "minLength": 2,
                       "maxLength": 5}}, "required": ["code"], "additionalProperties": False}, {"code": "abc"}),
    ("pattern", {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                 "required": ["zip"], "additionalProperties": False}, {"zip": "12345"}),
    ("date", {"type": "object", "properties": {"day": {"type": "string", "format": "date"}},
              "required": ["day"], "additionalProperties": False}, {"day": "2024-02-29"}),
    ("any-of", {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
                "required": ["v"], "additionalProperties": False}, {"v": "x"}),
    ("nullable", {"type": "object", "properties": {"note": {"type": ["string", "null"]}},
                  "required": ["note"], "additionalProperties": False}, {"note": None}),
    ("optional", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                  "required": ["a"], "additionalProperties": False}, {"a": 1}),
    ("refs", {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                               "required": ["x", "y"], "additionalProperties": False}},
              "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
              "required": ["a", "b"], "additionalProperties": False},
     {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 4}}),
    ("recursive", {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                   "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
                   "required": ["v", "kids"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
     {"v": 1, "kids": [{"v": 2, "kids": []}]}),
    ("array-of-objects", {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
        "additionalProperties": False}, {"items": [{"sku": "x1", "qty": 2}]}),
    ("free-dict", {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
     {"a": 1, "b": 2}),
    ("all-types", {"type": "object", "properties": {"s": {"type": "string"}, "i": {"type": "integer"},
                   "n": {"type": "number"}, "b": {"type": "boolean"}, "z": {"type": "null"},
                   "l": {"type": "array", "items": {"type": "number"}, "maxItems": 2}},
                   "required": ["s", "i", "n", "b", "z", "l"], "additionalProperties": False},
     {"s": "x", "i": -3, "n": 2.5e3, "b": False, "z": None, "l": [1.0]}),
]
