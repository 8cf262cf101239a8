"""Streaming inputs of growing size (up to 1 GB+) through the link job: peak memory and throughput.

One run, on this machine: a tiny random KD model exported to ONNX, a 2-shard index of a
synth KB, and inputs of ``--files`` Parquet files (row groups of 1,024 rows): at each of
``--gb`` sizes, mentions that each carry a distinct ~64 KB JPEG photo (random noise: JPEG
cannot shrink it), so the input's bytes are real image bytes to fetch, decode and resize,
as in a dump of posts; at each of ``--text-rows`` sizes, text-only mentions. Each link job
runs as its own driver process on a local Ray instance; from outside it the bench samples
every Ray worker's private RSS (``otmel.io.worker_memory``) and reads the driver's peak RSS
over the job (VmHWM, reset after the imports). Memory that does not grow with the input is
what the columns show.

Writes bench/results/stream.md.

    .venv/bin/python bench/stream.py [--gb 0.26 1.05] [--text-rows 20000 80000] [--files 8] [--image-kb 64]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def noise_jpeg(rng: np.random.Generator, kb: int) -> bytes:
    """A JPEG of about ``kb`` KB: random noise of a size that compresses to it."""
    side = int((kb * 1024 / 0.95) ** 0.5)  # measured ~0.95 bytes per pixel for noise at quality 90
    img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_input(template: pa.Table, out: Path, total_rows: int, files: int, image_kb: int, seed: int = 0) -> dict:
    """``files`` Parquet files of ``total_rows`` mentions in all, cycling over ``template``
    (new ids), each with its own photo of ``image_kb`` KB (0: text only)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows_per_file = -(-total_rows // files)
    base = template.select(["mention_id", "post_id", "mention", "text"])
    schema = base.schema.append(pa.field("image", pa.binary())) if image_kb else base.schema
    total_bytes, rows = 0, 0
    for f in range(files):
        path = out / f"posts-{f:03d}.parquet"
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, rows_per_file, 1024):
                n = min(1024, rows_per_file - start)
                idx = (np.arange(start, start + n) + f * rows_per_file) % base.num_rows
                chunk = base.take(pa.array(idx))
                ids = [f"{f}-{start + i}-{m}" for i, m in enumerate(chunk.column("mention_id").to_pylist())]
                chunk = chunk.set_column(0, "mention_id", pa.array(ids))
                if image_kb:
                    chunk = chunk.append_column("image", pa.array([noise_jpeg(rng, image_kb) for _ in range(n)],
                                                                  pa.binary()))
                writer.write_table(chunk, row_group_size=1024)
        total_bytes += path.stat().st_size
        rows += rows_per_file
    return {"files": files, "rows": rows, "bytes": total_bytes}


def run_link(cfg: dict) -> dict:
    """The link job as a driver process of its own; workers sampled from outside."""
    from otmel.io.worker_memory import SAMPLE_EVERY_S, WorkerMemory

    code = ("import json; from otmel.jobs.link import LinkConfig, run\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"
            f"r = run(LinkConfig(**{cfg!r}))\n"
            "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "print(json.dumps({'driver_peak_mb': hwm / 1024, 'summary': r.summary}, default=str))")
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = WorkerMemory(started, root_pid=proc.pid)  # the Ray instance this job starts
    while proc.poll() is None:
        memory.sample()
        time.sleep(SAMPLE_EVERY_S)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"link job failed:\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    report["workers_peak_mb"] = memory.by_kind()
    report["wall_seconds"] = time.time() - started
    return report


def main() -> None:
    import torch

    from otmel.exporters.onnx import ExportConfig, export
    from otmel.model.factory import TINY, create_model, save_model
    from otmel.jobs.index import IndexConfig
    from otmel.jobs.index import run as build_index
    from otmel.model.otmel import ModelConfig
    from otmel.data.synth import SYNTH_VOCABULARY, write_synthetic_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, nargs="+", default=[0.26, 1.05],
                    help="sizes of the inputs with photos, GB (image bytes dominate)")
    ap.add_argument("--text-rows", type=int, nargs="+", default=[20_000, 80_000],
                    help="sizes of the text-only inputs, rows")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--image-kb", type=int, default=64)
    ap.add_argument("--workers", default="1", help="encode actors (N or MIN-MAX)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stream.md"))
    args = ap.parse_args()

    runs = [(f"{gb:g} GB, photos", int(gb * 1e9 / (args.image_kb * 1024)) + 1, args.image_kb) for gb in args.gb]
    runs += [(f"{n // 1000}k rows, text", n, 0) for n in args.text_rows]
    results = []
    with tempfile.TemporaryDirectory(prefix="otmel-bench-stream-") as tmp_s:
        tmp = Path(tmp_s)
        write_synthetic_dataset(tmp / "synth", n_entities=300, n_mentions=600, seed=0)
        torch.manual_seed(0)
        model, pre = create_model(ModelConfig(mode="kd", text_length=24, **TINY), tiny=True, words=SYNTH_VOCABULARY)
        export(ExportConfig(checkpoint=str(save_model(model, pre, tmp / "ckpt")), out=str(tmp / "onnx"),
                            parity_batches=(4,)))
        os.environ["RAY_AUTH_MODE"] = "disabled"  # the index build below starts this process's own Ray
        build_index(IndexConfig(model=str(tmp / "onnx"), kb=str(tmp / "synth" / "kb.parquet"), out=str(tmp / "index"),
                                shards=2))
        import ray

        ray.shutdown()
        template = pq.read_table(tmp / "synth" / "mentions" / "train.parquet")
        for i, (name, rows, image_kb) in enumerate(runs):
            t0 = time.time()
            data = write_input(template, tmp / f"in-{i}", rows, args.files, image_kb)
            print(f"{name}: {data['rows']:,} mentions in {data['files']} files, {data['bytes'] / 1e9:.2f} GB "
                  f"({time.time() - t0:.0f} s to write)", flush=True)
            report = run_link(dict(model=str(tmp / "onnx"), index=str(tmp / "index"), input=str(tmp / f"in-{i}"),
                                   output=str(tmp / f"out-{i}"), workers=args.workers))
            results.append((name, data, report))
            shutil.rmtree(tmp / f"in-{i}")
            shutil.rmtree(tmp / f"out-{i}")
    lines = [
        "# Streaming inputs of growing size through `otmel link`: peak memory and throughput",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/stream.py', *sys.argv[1:]])}` on {platform.node()} "
        f"({os.cpu_count()} cores, CPU only), {datetime.date.today()}; tiny random KD model (ONNX), "
        "2-shard index of a 300-entity synth KB, a local Ray instance started by each job.",
        "",
        f"Inputs: {args.files} Parquet files each (row groups of 1,024 rows). With photos, every mention "
        f"carries its own ~{args.image_kb} KB JPEG (noise: incompressible), decoded and resized to the "
        "model's 32 px; text-only inputs have no image column.",
        "",
        "| measure | " + " | ".join(name for name, _, _ in results) + " |",
        "|---|" + "---:|" * len(results),
    ]

    def row(label, cells):
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("input", [f"{d['bytes'] / 1e9:.2f} GB" for _, d, _ in results])
    row("mentions linked (ok / error)", [f"{r['summary']['counts']['in']:,} ({r['summary']['counts']['ok']:,} / "
                                         f"{r['summary']['counts']['error']:,})" for _, _, r in results])
    row("job seconds (start-up included)", [f"{r['summary']['link_seconds']:.0f}" for _, _, r in results])
    row("start-up (shard actors loaded)", [f"{r['summary']['startup_seconds']:.1f} s" for _, _, r in results])

    def rate(d, r):
        work = r["summary"]["link_seconds"] - r["summary"]["startup_seconds"]
        return f"{r['summary']['counts']['in'] / work:,.0f} mentions/s, {d['bytes'] / 1e6 / work:.1f} MB/s"

    row("throughput after start-up", [rate(d, r) for _, d, r in results])
    row("driver peak RSS (VmHWM over the job)", [f"{r['driver_peak_mb']:.0f} MB" for _, _, r in results])
    kinds = sorted({k for _, _, r in results for k in r["workers_peak_mb"]})
    for kind in kinds:
        row(f"peak private RSS, `{kind}`", [f"{r['workers_peak_mb'][kind]:.0f} MB" if kind in r["workers_peak_mb"]
                                            else "-" for _, _, r in results])
    lines += ["", "Worker figures are the largest peak private RSS (RssAnon, sampled every 50 ms from "
              "outside) among the processes of each kind of the job's own Ray instance; shared "
              "object-store pages are not counted. A task worker runs many tasks in turn and is "
              "labelled by the first one seen. With photos, a read worker's floor is set by the "
              "input's row groups: Arrow decodes a dictionary-encoded binary column chunk (one "
              "64 MB row group here) whole before the first batch."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
