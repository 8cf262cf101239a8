"""Inputs the fault tests link: copies of the synth test split under new mention ids."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_split_copies(synth_dir: Path, directory: Path, copies: int) -> pa.Table:
    """Write ``copies`` input files, each the synth test split with ids prefixed ``<i>-``;
    return the split."""
    test = pq.read_table(synth_dir / "mentions" / "test.parquet")
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        ids = pa.array([f"{i}-{m}" for m in test.column("mention_id").to_pylist()])
        pq.write_table(test.set_column(test.column_names.index("mention_id"), "mention_id", ids),
                       directory / f"{i}.parquet")
    return test
