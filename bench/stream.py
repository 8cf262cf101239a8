"""Streaming a 1 GB+ input through the link job: peak memory and throughput.

One run, on this machine: a tiny random KD model exported to ONNX, a 2-shard index of a
synth KB, and an input of ``--files`` Parquet files (row groups of 1,024 rows) whose
mentions each carry a distinct ~64 KB JPEG photo (random noise: JPEG cannot shrink it), so
the input's bytes are real image bytes to fetch, decode and resize, as in a dump of posts.
The link job runs as its own driver process on a local Ray instance; from outside it the
bench samples every Ray worker's private RSS (``otmel.worker_memory``) and reads the
driver's peak RSS over the job (VmHWM, reset after the imports).

Writes bench/results/stream.md.

    .venv/bin/python bench/stream.py [--gb 1.05] [--files 8] [--image-kb 64]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
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


def write_input(template: pa.Table, out: Path, gb: float, files: int, image_kb: int, seed: int = 0) -> dict:
    """``files`` Parquet files of mentions cycling over ``template`` (new ids), each with its
    own photo, ``gb`` GB in all."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    per_row = image_kb * 1024
    rows_per_file = int(gb * 1e9 / per_row / files) + 1
    base = template.select(["mention_id", "post_id", "mention", "text"])
    total_bytes, rows = 0, 0
    for f in range(files):
        path = out / f"posts-{f:03d}.parquet"
        with pq.ParquetWriter(path, base.schema.append(pa.field("image", pa.binary()))) as writer:
            for start in range(0, rows_per_file, 1024):
                n = min(1024, rows_per_file - start)
                idx = (np.arange(start, start + n) + f * rows_per_file) % base.num_rows
                chunk = base.take(pa.array(idx))
                ids = [f"{f}-{start + i}-{m}" for i, m in enumerate(chunk.column("mention_id").to_pylist())]
                chunk = chunk.set_column(0, "mention_id", pa.array(ids))
                chunk = chunk.append_column("image", pa.array([noise_jpeg(rng, image_kb) for _ in range(n)], pa.binary()))
                writer.write_table(chunk, row_group_size=1024)
        total_bytes += path.stat().st_size
        rows += rows_per_file
    return {"files": files, "rows": rows, "bytes": total_bytes}


def run_link(cfg: dict) -> dict:
    """The link job as a driver process of its own; workers sampled from outside."""
    from otmel.worker_memory import WorkerMemory

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
        time.sleep(0.25)
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
    from otmel.factory import TINY, create_model, save_model
    from otmel.jobs.index import IndexConfig
    from otmel.jobs.index import run as build_index
    from otmel.model import ModelConfig
    from otmel.synth import SYNTH_VOCABULARY, write_synthetic_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.05, help="input size, GB (image bytes dominate)")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--image-kb", type=int, default=64)
    ap.add_argument("--workers", default="1", help="encode actors (N or MIN-MAX)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stream.md"))
    args = ap.parse_args()

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
        t0 = time.time()
        data = write_input(pq.read_table(tmp / "synth" / "mentions" / "train.parquet"), tmp / "in", args.gb,
                           args.files, args.image_kb)
        print(f"input: {data['rows']:,} mentions in {data['files']} files, {data['bytes'] / 1e9:.2f} GB "
              f"({time.time() - t0:.0f} s to write)", flush=True)
        report = run_link(dict(model=str(tmp / "onnx"), index=str(tmp / "index"), input=str(tmp / "in"),
                               output=str(tmp / "out"), workers=args.workers))
    s = report["summary"]
    work = s["link_seconds"] - s["startup_seconds"]
    lines = [
        "# Streaming a 1 GB+ input through `otmel link`",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/stream.py', *sys.argv[1:]])}` on {platform.node()} "
        f"({os.cpu_count()} cores, CPU only), {datetime.date.today()}; tiny random KD model (ONNX), "
        "2-shard index of a 300-entity synth KB, local Ray instance started by the job.",
        "",
        f"Input: {data['rows']:,} mentions in {data['files']} Parquet files (row groups of 1,024 rows), "
        f"**{data['bytes'] / 1e9:.2f} GB**, each mention with its own ~{args.image_kb} KB JPEG (noise: "
        "incompressible), decoded and resized to the model's 32 px.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| mentions linked | {s['counts']['in']:,} (ok {s['counts']['ok']:,}, error {s['counts']['error']:,}) |",
        f"| job seconds (start-up included) | {s['link_seconds']:.0f} |",
        f"| start-up (shard actors loaded) | {s['startup_seconds']:.1f} s |",
        f"| throughput after start-up | {s['counts']['in'] / work:,.0f} mentions/s, "
        f"{data['bytes'] / 1e6 / work:.1f} MB/s of input |",
        f"| driver peak RSS (VmHWM over the job) | {report['driver_peak_mb']:.0f} MB |",
    ]
    for kind, mb in sorted(report["workers_peak_mb"].items()):
        lines.append(f"| peak private RSS, `{kind}` | {mb:.0f} MB |")
    lines += ["", "Worker figures are the largest peak private RSS (RssAnon, sampled every 0.25 s from "
              "outside) among the processes of each kind; shared object-store pages are not counted. "
              "A task worker runs many tasks in turn and is labelled by the first one seen."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
