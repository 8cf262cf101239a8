"""Inputs the fault tests link: copies of the synth test split under new mention ids."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_split_copies(synth_dir: Path, directory: Path, copies: int, repeat: int = 1) -> pa.Table:
    """Write ``copies`` input files, each the synth test split ``repeat`` times with ids
    prefixed ``<i>-`` (``<i>.<r>-`` when repeated); return the split."""
    test = pq.read_table(synth_dir / "mentions" / "test.parquet")
    mention_ids = test.column("mention_id").to_pylist()
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        prefixes = [f"{i}.{r}" for r in range(repeat)] if repeat > 1 else [f"{i}"]
        ids = pa.array([f"{p}-{m}" for p in prefixes for m in mention_ids])
        table = pa.concat_tables([test] * repeat)
        pq.write_table(table.set_column(table.column_names.index("mention_id"), "mention_id", ids),
                       directory / f"{i}.parquet")
    return test
