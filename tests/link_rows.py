"""Comparing link outputs of two runs (the test suites share it)."""

from __future__ import annotations

import numpy as np


def assert_same_link_rows(a: list[dict], b: list[dict], atol: float = 1e-5) -> None:
    """Same mentions in the same order, same links, statuses and candidate lists; scores to
    float rounding: the batch a mention is encoded in differs between runs, and ONNX Runtime's
    result for a row moves by ~1e-7 with the batch size."""
    assert [r["mention_id"] for r in a] == [r["mention_id"] for r in b]
    for x, y in zip(a, b):
        assert (x["entity_id"], x["status"], x["error"]) == (y["entity_id"], y["status"], y["error"]), x["mention_id"]
        assert [c["entity_id"] for c in x["candidates"] or []] == [c["entity_id"] for c in y["candidates"] or []]
        assert np.allclose([c["score"] for c in x["candidates"] or []], [c["score"] for c in y["candidates"] or []],
                           atol=atol), x["mention_id"]
        assert (x["score"] is None) == (y["score"] is None)
        assert x["score"] is None or abs(x["score"] - y["score"]) <= atol, x["mention_id"]
