"""Strict JSON schemas of the custom resources k8s/ uses, from their CRDs as released.

tests/k8s/crds/ holds each CRD's openAPIV3Schema as its project released it (the file
names the project and version; ``source`` inside says which file of which tag). They
are made strict as kubernetes-validate makes the built-in kinds: an object schema that
lists its properties refuses others (unless the CRD keeps unknown fields), so a
misspelt field is an error, not silently dropped by the API server.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

CRDS = Path(__file__).parent / "crds"


def _strict(schema: Any) -> Any:
    """Every object schema with properties refuses others (unless the CRD keeps unknowns)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft202012Validator]:
    validators = {}
    for path in CRDS.glob("*.json"):
        crd = json.loads(path.read_text())
        schema = _strict(crd["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # checked by Kubernetes itself
        api_version = f"{crd['group']}/{crd['version']}"
        validators[(api_version, crd["kind"])] = jsonschema.Draft202012Validator(schema)
    return validators


def validate_custom(obj: dict[str, Any]) -> str | bool | None:
    """The object's first error, None if valid, False if no vendored CRD has its kind."""
    validator = crd_validators().get((obj["apiVersion"], obj["kind"]))
    if validator is None:
        return False
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    return f"{where}: {errors[0].message} at {list(errors[0].path)}" if errors else None
