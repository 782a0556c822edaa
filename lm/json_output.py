"""The JSON files the project writes (metrics.json, evaluation.json, bench.json, scores): valid JSON,
which has no NaN or Infinity, so a number that is not finite is written as null."""

import json
import math
from typing import Any


def json_text(document: Any) -> str:
    """`document` as indented JSON, every non-finite float (at any depth) as null."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(document), indent=2, allow_nan=False) + "\n"
