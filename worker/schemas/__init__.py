"""The published contracts, shipped as package data: the JSON Schemas of the job (wire format v1)
and the status event (v1), and the AsyncAPI 3.0 document of the streams that carry them.

`sms-worker schema job|event|asyncapi` prints them. tests/unit/test_schemas.py holds the job
validators (worker.models) to the job schema, test_event_schema.py the events (worker.events and
its callers) to the event schema, test_asyncapi.py the document to AsyncAPI 3.0 and to the store's
key names.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Final

import orjson

FILES: Final = {
    "job": "job-v1.schema.json",
    "event": "event-v1.schema.json",
    "asyncapi": "asyncapi.yaml",
}


def text(name: str) -> str:
    """The document `name` (a key of FILES) as shipped, byte for byte."""
    return resources.files(__name__).joinpath(FILES[name]).read_text(encoding="utf-8")


def load(name: str) -> dict[str, Any]:
    """A JSON Schema (`job` or `event`) as a dict."""
    value = orjson.loads(text(name))
    if not isinstance(value, dict):  # pragma: no cover - the shipped files are objects
        raise ValueError(f"{FILES[name]} is not a JSON object")
    return value
