"""JSON Schemas of the spec and the lock, generated from the pydantic models (committed under schemas/)."""

from __future__ import annotations

import json

SCHEMA_FILES = {"spec": "spec.schema.json", "lock": "lock.schema.json"}


def schema(which: str) -> dict:
    if which == "spec":
        from planc.spec import Spec as model
        title = "planc spec (spec.yaml)"
    else:
        from planc.plan import Plan as model
        title = "planc lock (plan.lock)"
    data = model.model_json_schema(mode="validation")
    data["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    data["title"] = title
    return data


def schema_text(which: str) -> str:
    return json.dumps(schema(which), indent=2, sort_keys=True) + "\n"
