"""The driver of the data jobs holds metadata only: its peak RSS does not grow with the input.

Each job runs as its own driver process joined to the session's Ray instance; the process
reports its peak RSS during the job (VmHWM, reset after the imports). A driver that collected output rows (or
encoded entity features) would grow by tens of MB between the two sizes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

#: allowed growth of the link driver's peak RSS from the small to the 4x input, MB: its
#: own bookkeeping grows by ~1 KB per batch (part metadata, block refs; measured +0.8 MB
#: from 10k to 40k rows); an output row with its top-20 candidates is ~0.7 KB, so holding
#: the 15k extra rows of the large input would add ~10 MB (measured: +20 MB for 30k rows).
LINK_DRIVER_GROWTH_MB = 5
#: the index driver reads the KB's identity (ids, aliases: ~2 KB per entity here, +6.5 MB
#: from 1k to 4k entities); holding the 3k extra entities' features would add ~20 MB more
#: (measured +20.4 MB).
INDEX_DRIVER_GROWTH_MB = 12


def _peak_rss_mb(module: str, config: str, cfg: dict) -> tuple[float, dict]:
    """The driver's peak RSS during the job alone: the high-water mark (VmHWM) is reset after
    the imports (``echo 5 > /proc/self/clear_refs``), whose transient peak would otherwise
    hide any growth during the job."""
    code = (f"import json; from {module} import {config}, run\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"
            f"r = run({config}(**{cfg!r}))\n"
            "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "print(json.dumps({'peak_kb': hwm, "
            "'summary': getattr(r, 'summary', None) or {'count': getattr(r, 'count', None)}}, default=str))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["peak_kb"] / 1024, report["summary"]


def _mentions(test: pa.Table, rows: int) -> pa.Table:
    """``rows`` text-only mentions (unique ids) from the synth test split."""
    reps = -(-rows // test.num_rows)
    base = test.drop_columns([c for c in ("image", "image_uri") if c in test.column_names])
    return pa.concat_tables([base.set_column(0, "mention_id", pa.array([f"{r}-{m}" for m in base.column("mention_id").to_pylist()]))
                             for r in range(reps)]).slice(0, rows)


def test_link_driver_memory_is_flat_in_the_input_size(ray_local, s3_index, onnx_model, synth_dir, tmp_path, s3_server):
    test = pq.read_table(synth_dir / "mentions" / "test.parquet")
    peaks = {}
    for rows in (5_000, 20_000):
        (tmp_path / f"in-{rows}").mkdir()
        pq.write_table(_mentions(test, rows), tmp_path / f"in-{rows}" / "mentions.parquet")
        cfg = dict(model=onnx_model, index=s3_index[0].out, input=str(tmp_path / f"in-{rows}"),
                   output=str(tmp_path / f"out-{rows}"), top_k=20, candidates=20, batch_size=1024,
                   s3_endpoint=s3_server, address=ray_local.get_runtime_context().gcs_address)
        peaks[rows], summary = _peak_rss_mb("otmel.jobs.link", "LinkConfig", cfg)
        assert summary["counts"]["in"] == rows and summary["counts"]["ok"] + summary["counts"]["nil"] == rows
    print("link driver peak RSS MB", peaks)
    assert peaks[20_000] - peaks[5_000] < LINK_DRIVER_GROWTH_MB, peaks


def test_index_driver_memory_is_flat_in_the_kb_size(ray_local, onnx_model, synth_dir, tmp_path):
    kb = pq.read_table(synth_dir / "kb.parquet")
    kb = kb.drop_columns([c for c in ("image", "image_uri") if c in kb.column_names])
    peaks = {}
    for n in (1_000, 4_000):
        reps = -(-n // kb.num_rows)
        big = pa.concat_tables([kb.set_column(0, "entity_id", pa.array([f"{r}-{e}" for e in kb.column("entity_id").to_pylist()]))
                                for r in range(reps)]).slice(0, n)
        pq.write_table(big, tmp_path / f"kb-{n}.parquet")
        cfg = dict(model=onnx_model, kb=str(tmp_path / f"kb-{n}.parquet"), out=str(tmp_path / f"index-{n}"), shards=2,
                   batch_size=512, address=ray_local.get_runtime_context().gcs_address)
        peaks[n], _ = _peak_rss_mb("otmel.jobs.index", "IndexConfig", cfg)
        manifest = json.loads((tmp_path / f"index-{n}" / "manifest.json").read_text())
        assert manifest["count"] == n
    # the tiny model encodes 1,674 fp32 feature values (6.7 KB) per entity (17 KB at real size)
    print("index driver peak RSS MB", peaks)
    assert peaks[4_000] - peaks[1_000] < INDEX_DRIVER_GROWTH_MB, peaks
