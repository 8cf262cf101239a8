"""Training pairs: mentions joined with their gold KB entities, batched and preprocessed.

A dataset directory (DESIGN.md) holds ``kb.parquet`` and ``mentions/{train,dev,test}.parquet``.
Rows that cannot be trained on are skipped and COUNTED with a reason (never silently):
a gold entity id missing from the KB, a missing gold id, an empty mention string.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from pathlib import Path

import numpy as np
import pyarrow as pa

from otmel.model.preprocessing import Preprocessor

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


def dataset_uris(root: str | Path, split: str) -> tuple[str, str]:
    """(kb.parquet, mentions/SPLIT.parquet) URIs of a dataset directory (local or s3://)."""
    from otmel.io.storage import join

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return join(str(root), "kb.parquet"), join(str(root), "mentions", f"{split}.parquet")


def load_split(root: str | Path, split: str, s3_endpoint: str | None = None) -> tuple[pa.Table, pa.Table]:
    """Read and validate (kb, mentions) of a dataset directory; clear errors if absent/empty."""
    from otmel.data.schemas import check_kb, check_mentions
    from otmel.io.storage import read_parquet

    kb_uri, m_uri = dataset_uris(root, split)
    try:
        kb = check_kb(read_parquet(kb_uri, s3_endpoint), kb_uri)
        mentions = check_mentions(read_parquet(m_uri, s3_endpoint), m_uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"dataset {root}: {exc}") from exc
    if kb.num_rows == 0:
        raise ValueError(f"{kb_uri}: the KB is empty")
    if mentions.num_rows == 0:
        raise ValueError(f"{m_uri}: the {split} split is empty")
    return kb, mentions


def usable_pairs(mentions: pa.Table, kb: pa.Table) -> tuple[np.ndarray, np.ndarray, Counter]:
    """(mention rows, their gold KB rows, skipped counts by reason) of the trainable pairs."""
    kb_index = {e: i for i, e in enumerate(kb.column("entity_id").to_pylist())}
    rows, gold_rows, skipped = [], [], Counter()
    for i, (g, m) in enumerate(zip(mentions.column("gold_entity_id").to_pylist(), mentions.column("mention").to_pylist())):
        if g is None:
            skipped["no_gold_entity_id"] += 1
        elif g not in kb_index:
            skipped["unknown_gold_entity_id"] += 1
        elif not (m or "").strip():
            skipped["empty_mention"] += 1
        else:
            rows.append(i)
            gold_rows.append(kb_index[g])
    return np.asarray(rows, dtype=np.int64), np.asarray(gold_rows, dtype=np.int64), skipped


@dataclass
class PairBatch:
    mention_inputs: dict
    entity_inputs: dict
    entity_ids: list[str]


@dataclass
class PairDataset:
    """(mention, gold entity) pairs over a KB, preprocessed batch by batch."""

    mentions: pa.Table
    kb: pa.Table
    preprocessor: Preprocessor
    rows: np.ndarray = field(init=False)  # usable mention row indices
    gold_rows: np.ndarray = field(init=False)  # KB row of each usable mention
    skipped: Counter = field(init=False)

    def __post_init__(self):
        self.rows, self.gold_rows, self.skipped = usable_pairs(self.mentions, self.kb)
        if self.skipped:
            log.warning("skipped %d of %d mentions: %s", sum(self.skipped.values()), self.mentions.num_rows,
                        dict(self.skipped))
        if len(self.rows) == 0:
            raise ValueError("no usable (mention, gold entity) pair: " + str(dict(self.skipped)))

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: np.ndarray) -> PairBatch:
        m_rows = self.mentions.take(pa.array(self.rows[positions]))
        e_rows = self.kb.take(pa.array(self.gold_rows[positions]))
        mb = self.preprocessor.mentions(m_rows.select(["mention", "text", "image"]).to_pydict())
        eb = self.preprocessor.entities(e_rows.select(["name", "attributes", "image"]).to_pydict())
        return PairBatch(mb.model_inputs(), eb.model_inputs(), e_rows.column("entity_id").to_pylist())
