"""Linguistic and visual entity features from the otmel CLIP encoder (``otmel kge features``).

OTKGE fuses, per entity, a linguistic and a visual feature vector with its structural
embedding. WN9-IMG and FB-IMG ship theirs; for a KB of this project they come from the same
encoder that links: the trained OT-MEL model (checkpoint or ONNX export) over the KB row, as
the index job reads it:

* ``ling``: the CLIP text summary ``t`` of the entity text (``name [SEP] attributes``, the
  model's entity template): the text tower's projected end-of-text embedding;
* ``visual``: the CLIP image summary ``v`` of its image (``image`` bytes, or ``image_uri``
  fetched under the same policy as the index job); entities without a usable image get no
  visual vector (null; ``otmel kge train`` uses zeros for them and says how many).

Output: Parquet ``entity_id``, ``ling``, ``visual`` (list<float32>): the ``--features`` file
of ``otmel kge train``. Rows are encoded in batches, one batch of the KB in memory at a time;
a KB row without an entity_id or a usable text is counted and skipped, never silently.
Single process (the KGs OTKGE trains on have 10^4-10^5 entities); GPU when present.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

FEATURES_SCHEMA = pa.schema([("entity_id", pa.string()), ("ling", pa.list_(pa.float32())),
                             ("visual", pa.list_(pa.float32()))])


@dataclass
class FeatureReport:
    entities: int = 0  # rows written
    without_image: int = 0  # rows written with a null visual vector
    bad_images: Counter = field(default_factory=Counter)  # reason -> image given but not fetched (visual null)
    skipped: Counter = field(default_factory=Counter)  # reason -> KB rows not written
    ling_dim: int = 0
    visual_dim: int = 0


def encode_kb_features(model_uri: str, kb_uri: str, out_uri: str, batch_size: int = 64,
                       s3_endpoint: str | None = None, allow_image_prefix: tuple[str, ...] = (),
                       progress=None) -> FeatureReport:
    """Write the ``ling`` / ``visual`` features of every KB entity (module docstring)."""
    import pyarrow.parquet as pq

    from otmel.backend import load_backend
    from otmel.linking.image_fetch import ImagePolicy, fetch_images
    from otmel.model.preprocessing import MODEL_INPUTS
    from otmel.io.storage import resolve, write_bytes

    backend = load_backend(model_uri, s3_endpoint)
    policy = ImagePolicy(allowed_prefixes=tuple(allow_image_prefix), s3_endpoint=s3_endpoint)
    fs, path = resolve(kb_uri, s3_endpoint)
    report = FeatureReport()
    sink = pa.BufferOutputStream()
    with fs.open_input_file(path) as f, pq.ParquetWriter(sink, FEATURES_SCHEMA, compression="zstd") as writer:
        kb = pq.ParquetFile(f)
        columns = [c for c in ("entity_id", "name", "attributes", "image", "image_uri") if c in kb.schema_arrow.names]
        if "entity_id" not in columns or "name" not in columns:
            raise ValueError(f"{kb_uri}: a KB needs entity_id and name columns, has {kb.schema_arrow.names}")
        done = 0
        for record_batch in kb.iter_batches(batch_size=batch_size, columns=columns):
            rows = record_batch.to_pydict()
            n = len(rows["entity_id"])
            images, fetch_errors = fetch_images(rows.get("image", [None] * n), rows.get("image_uri", [None] * n), policy)
            batch = backend.preprocessor.entities({"name": rows["name"], "attributes": rows.get("attributes", [None] * n),
                                                   "image": images})
            keep = [i for i in range(n) if rows["entity_id"][i] not in (None, "") and batch.ok[i]]
            for i in range(n):
                if rows["entity_id"][i] in (None, ""):
                    report.skipped["missing_id"] += 1
                elif not batch.ok[i]:
                    report.skipped[str(batch.errors[i]).split(":")[0]] += 1
            report.bad_images.update(e.split(":")[0] for i, e in enumerate(fetch_errors) if e and i in keep)
            if keep:
                feats = backend.encode({k: getattr(batch, k)[keep] for k in MODEL_INPUTS},
                                       ("text_summary", "vision_summary", "has_image"))
                ling = np.asarray(feats["text_summary"], dtype=np.float32)
                visual = np.asarray(feats["vision_summary"], dtype=np.float32)
                has = np.asarray(feats["has_image"], dtype=bool)
                report.ling_dim, report.visual_dim = ling.shape[1], visual.shape[1]
                report.without_image += int((~has).sum())
                writer.write_table(pa.table({
                    "entity_id": [str(rows["entity_id"][i]) for i in keep],
                    "ling": [v.tolist() for v in ling],
                    "visual": [v.tolist() if h else None for v, h in zip(visual, has)],
                }, schema=FEATURES_SCHEMA))
                report.entities += len(keep)
            done += n
            if progress:
                progress(f"{done}/{kb.metadata.num_rows} KB rows encoded")
    write_bytes(out_uri, sink.getvalue().to_pybytes(), s3_endpoint)
    if report.skipped:
        log.warning("%s: %d KB row(s) skipped: %s", kb_uri, sum(report.skipped.values()), dict(report.skipped))
    if report.bad_images:
        log.warning("%s: %d image(s) could not be fetched (no visual vector): %s", kb_uri,
                    sum(report.bad_images.values()), dict(report.bad_images))
    return report
