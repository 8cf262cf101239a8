"""Inputs the fault tests link: copies of the synth test split under new mention ids."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_split_copies(synth_dir: Path, directory: Path, copies: int, repeat: int = 1) -> pa.Table:
    """Write ``copies`` input files, each the synth test split ``repeat`` times with ids
    prefixed ``<i>-`` (``<i>.<r>-`` when repeated); return the split."""
    test = pq.read_table(synth_dir / "mentions" / "test.parquet")
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        parts = []
        for r in range(repeat):
            prefix = f"{i}.{r}" if repeat > 1 else f"{i}"
            ids = pa.array([f"{prefix}-{m}" for m in test.column("mention_id").to_pylist()])
            parts.append(test.set_column(test.column_names.index("mention_id"), "mention_id", ids))
        pq.write_table(pa.concat_tables(parts), directory / f"{i}.parquet")
    return test
