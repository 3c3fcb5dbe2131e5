"""``report.json``'s contract: the JSON Schema shipped beside this module (``report.schema.json``), checked with
``jsonschema``; ``docs/report_schema.md`` says what each key means."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

from jsonschema import Draft202012Validator, ValidationError


@cache
def report_schema() -> dict[str, Any]:
    """The schema, read once from the package."""
    return json.loads(files(__package__).joinpath("report.schema.json").read_text(encoding="utf-8"))


NULL = {"type": "null"}
SCHEMA_VERSION: int = report_schema()["properties"]["schema_version"]["const"]


def validate_report(report: Any) -> list[str]:
    """Problems with ``report`` against the schema, one readable line each (``where: what``), a missing key named
    with the path to it; [] means valid."""
    validator = Draft202012Validator(report_schema())
    lines = [line for error in validator.iter_errors(report) for line in _lines(error)]
    return sorted(dict.fromkeys(lines))


def _lines(error: ValidationError) -> list[str]:
    if error.context:  # a value that may be null: what is wrong with it as the object it is
        return [line for sub in error.context if sub.schema != NULL for line in _lines(sub)]
    where = _path(error.absolute_path)
    if error.validator == "required":
        return [f"{where}.{key}".lstrip(".") + f": missing key {key!r}" for key in error.validator_value
                if key not in error.instance]
    return [f"{where or 'report'}: {error.message}"]


def _path(parts: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
