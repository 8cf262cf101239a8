"""The driver of the data jobs holds metadata only and the link job's workers stream: peak
RSS does not grow with the input.

Each job runs as its own driver process joined to the session's Ray instance; the process
reports its peak RSS during the job (VmHWM, reset after the imports). A driver that collected output rows (or
encoded entity features) would grow by tens of MB between the two sizes. The job's worker
processes are measured from outside, by the test: the peak of the private (anonymous) RSS
of every Ray worker process started during the job, sampled every 50 ms (otmel.io.worker_memory), by what it ran.
Not VmHWM: a worker's RSS also counts the object store's shared pages it has read, which
grow with the data that passed through it whatever it keeps (measured: +90 to +215 MB per
worker kind from 5k to 20k rows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

#: allowed growth of the link driver's peak RSS from the small to the 4x input, MB: its
#: own bookkeeping grows by ~1 KB per batch (part metadata, block refs; measured +0.8 MB
#: from 10k to 40k rows); an output row with its top-20 candidates is ~0.7 KB, so holding
#: the 15k extra rows of the large input would add ~10 MB (measured: +20 MB for 30k rows).
LINK_DRIVER_GROWTH_MB = 5
#: the index driver reads the KB's identity (ids, aliases: ~2.2 KB per entity here, +6.5 MB
#: from 1k to 4k entities); holding the extra entities' features would add ~6.8 KB per entity
#: more (measured +20.4 MB for 3k). From 1k to 6k entities: ~11 MB of identity against ~45 MB
#: with the features, so the limit sits ~17 MB from both (a loaded machine moved the 4k
#: figure by up to 6 MB; a limit of 12 MB over 3k entities failed at 12.3 MB under load).
INDEX_DRIVER_GROWTH_MB = 28
#: the KB sizes the index driver is measured at
INDEX_KB_SIZES = (1_000, 6_000)
#: allowed growth of a link worker kind's peak private RSS (read, encode, link, shard actors,
#: the commit coordinator) from the small to the 4x input, MB. Measured with 8 MiB blocks
#: (jobs/common.py TARGET_BLOCK_BYTES): read +16, link +8, encode +0.1, shard and
#: coordinator ~0; with Ray Data's default 128 MiB blocks the encode actor grew +154 and the
#: link actor +81 (a block held the whole input file).
LINK_WORKER_GROWTH_MB = 24
#: ... except the preprocess tasks' workers: each runs one 1,024-row batch after another and
#: its allocator warms up over the first ones (measured +26 MB from 5k to 20k rows and +10 MB
#: more to 60k, flattening); a worker that kept its output batches would add 12 KB per row
#: (the (3, 32, 32) float32 pixels of every text-only row), +184 MB over the 15k extra rows.
LINK_PREPROCESS_GROWTH_MB = 48
#: ... and the kinds that run in task workers which may have run preprocess tasks first: Ray
#: reuses an idle task worker for the next task of any kind, and the private RSS a worker
#: shows under its new title keeps what its allocator retained from the preprocessing (a
#: file's commit task, which streams one staged part at a time, showed 124 -> 150 MB: the
#: preprocess workers' 136 -> 156). Neither limit would see a commit that held its whole
#: output file here (~0.7 KB per row: ~10 MB for the 15k extra rows)
AFTER_PREPROCESS_KINDS = ("preprocess_mentions", "commit_output_file")


def _peak_rss_mb(module: str, config: str, cfg: dict, workers: dict | None = None) -> tuple[float, dict]:
    """The driver's peak RSS during the job alone: the high-water mark (VmHWM) is reset after
    the imports (``echo 5 > /proc/self/clear_refs``), whose transient peak would otherwise
    hide any growth during the job. With ``workers`` (a dict), the peak RSS of the job's
    worker processes, by kind, is sampled from outside into it."""
    import time
    code = (f"import json; from {module} import {config}, run\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"
            f"r = run({config}(**{cfg!r}))\n"
            "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "print('OTMEL_REPORT', json.dumps({'peak_kb': hwm, "
            "'summary': getattr(r, 'summary', None) or {'count': getattr(r, 'count', None)}}, default=str))")
    from otmel.io.worker_memory import SAMPLE_EVERY_S, WorkerMemory

    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = WorkerMemory(started, root_pid=os.getpid())  # the session's Ray instance
    try:
        while proc.poll() is None and time.time() - started < 900:
            if workers is not None:
                memory.sample()
            time.sleep(SAMPLE_EVERY_S)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    if workers is not None:
        workers.update(memory.by_kind())
    # the report's own line: Ray prints its workers' warnings (raylet) to the driver's stdout too
    report = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("OTMEL_REPORT "))
                        .split(" ", 1)[1])
    return report["peak_kb"] / 1024, report["summary"]


def _mentions(test: pa.Table, rows: int) -> pa.Table:
    """``rows`` text-only mentions (unique ids) from the synth test split."""
    reps = -(-rows // test.num_rows)
    base = test.drop_columns([c for c in ("image", "image_uri") if c in test.column_names])
    return pa.concat_tables([base.set_column(0, "mention_id", pa.array([f"{r}-{m}" for m in base.column("mention_id").to_pylist()]))
                             for r in range(reps)]).slice(0, rows)


def test_link_driver_memory_is_flat_in_the_input_size(ray_local, s3_index, onnx_model, synth_dir, tmp_path, s3_server,
                                                      record_property):
    test = pq.read_table(synth_dir / "mentions" / "test.parquet")
    peaks, workers = {}, {}
    for rows in (5_000, 20_000):
        (tmp_path / f"in-{rows}").mkdir()
        # row groups of 2,048 rows: Parquet is read a row group at a time, so a read task's
        # memory follows the row group size (a writer's choice: Spark and pyarrow cap them), not the file's
        pq.write_table(_mentions(test, rows), tmp_path / f"in-{rows}" / "mentions.parquet", row_group_size=2048)
        cfg = dict(model=onnx_model, index=s3_index[0].out, input=str(tmp_path / f"in-{rows}"),
                   output=str(tmp_path / f"out-{rows}"), top_k=20, candidates=20, batch_size=1024,
                   s3_endpoint=s3_server, address=ray_local.get_runtime_context().gcs_address)
        workers[rows] = {}
        peaks[rows], summary = _peak_rss_mb("otmel.jobs.link", "LinkConfig", cfg, workers[rows])
        assert summary["counts"]["in"] == rows and summary["counts"]["ok"] + summary["counts"]["nil"] == rows
    print("link driver peak RSS MB", peaks, "workers", workers)
    record_property("driver_peak_mb", {k: round(v) for k, v in peaks.items()})  # figures for docs/reliability.md
    record_property("worker_peak_mb", {n: {k: round(v) for k, v in w.items()} for n, w in workers.items()})
    assert peaks[20_000] - peaks[5_000] < LINK_DRIVER_GROWTH_MB, peaks
    # every kind of worker was seen in both runs, and none grows with the input
    kinds = set(workers[5_000]) & set(workers[20_000])
    assert {"ShardServer", "CommitCoordinator"} <= kinds and any("Encode" in k for k in kinds) \
        and any("LinkStage" in k for k in kinds) and any("read_inputs" in k for k in kinds) \
        and any("preprocess_mentions" in k for k in kinds), workers
    growth = {k: round(workers[20_000][k] - workers[5_000][k], 1) for k in kinds}
    allowed = {k: LINK_PREPROCESS_GROWTH_MB if any(a in k for a in AFTER_PREPROCESS_KINDS) else LINK_WORKER_GROWTH_MB
               for k in kinds}
    assert all(growth[k] < allowed[k] for k in kinds), (growth, workers)


def test_index_driver_memory_is_flat_in_the_kb_size(ray_local, onnx_model, synth_dir, tmp_path):
    kb = pq.read_table(synth_dir / "kb.parquet")
    kb = kb.drop_columns([c for c in ("image", "image_uri") if c in kb.column_names])
    peaks = {}
    for n in INDEX_KB_SIZES:
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
    small, large = INDEX_KB_SIZES
    assert peaks[large] - peaks[small] < INDEX_DRIVER_GROWTH_MB, peaks
