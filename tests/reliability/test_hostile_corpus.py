"""A hostile corpus linked with ``--bad-image text``: truncated, non-image and
decompression-bomb images, NUL bytes and non-UTF-8 lines, an empty and a 1 MB text, null and
wrongly typed fields, a duplicate mention id, reversed and negative spans, broken JSON lines,
a JSON line nested 100k deep, invalid UTF-8 in a Parquet string column, a Parquet row group
damaged in storage (footer intact),
an empty file, a zero-row Parquet and a non-Parquet file named .parquet; a 200 MB JSONL line
and a 200 MB text in a Parquet row group.

The job stays alive and every input row comes back exactly once, with a status and, for an
error, its reason; rows whose only problem is their image are linked on their text. No
process of the job grows past :data:`JOB_PROCESS_LIMIT_MB` (docs/reliability.md): one 200 MB
text line used to drive a preprocess worker to 16.7 GB and stall the job.
"""

from __future__ import annotations

import io
import json
import os
import threading
import struct
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from conftest import ONE_ACTOR_EACH
from hostile_files import damage_row_group, deeply_nested_json_line, string_column_with_invalid_utf8

from otmel.io.worker_memory import SAMPLE_EVERY_S, WorkerMemory
from otmel.jobs.link import LinkConfig, run
from otmel.linking.link_output import read_link_output
from otmel.data.schemas import LINK_STATUSES

#: the most private memory any process of a link job may reach with a 200 MB line or value in
#: its input, default settings (docs/reliability.md); measured ~0.5 GB for the Parquet value's
#: read (its column data, then the Python string), the JSONL line streamed by in 1 MiB pieces
JOB_PROCESS_LIMIT_MB = 2048
GIANT = 200 * 1024 * 1024


def _png(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A ~100-byte PNG whose header claims 100 M pixels: above otmel's cap (50 M), below the
    size at which Pillow itself refuses to open an image (2 x 89 M)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_a_hostile_corpus_comes_back_row_for_row_and_bad_images_link_on_text(ray_local, model_and_index, synth_dir,
                                                                             tmp_path):
    model, index = model_and_index
    src = tmp_path / "in"
    src.mkdir()
    good = pq.read_table(synth_dir / "mentions" / "test.parquet").slice(0, 9).to_pylist()
    png = _png()
    images = [png, png[:60], _bomb_png(), b"this is not an image", png, png, png, png, png]
    rows = []
    for i, (r, img) in enumerate(zip(good, images)):
        rows.append({**r, "image": img, "image_uri": None})
    rows[4]["text"] = "a caption \x00 with NUL \x00 bytes"
    rows[5]["text"] = "word " * 200_000  # 1 MB
    rows[6]["mention"] = None  # a null mention: linked on its context, or an error with a reason
    rows[7]["mention_id"] = rows[0]["mention_id"]  # a duplicate id
    rows[8]["text"] = None
    pq.write_table(pa.Table.from_pylist(rows), src / "mentions.parquet")
    text = "Robert and Holland in Paris"
    posts = [
        b"\xff\xfe\xfa not utf-8 at all",
        json.dumps({"post_id": "q2", "text": text, "mentions": [{"mention": "Paris", "start": 24, "end": 20}]}).encode(),
        json.dumps({"post_id": "q3", "text": text, "mentions": [{"mention": "Robert", "start": -3, "end": 6}]}).encode(),
        json.dumps({"post_id": "q4", "text": 12345, "mentions": [{"mention": "x", "start": 0, "end": 1}]}).encode(),
        b'{"post_id": "q5", "text": "cut off in the midd',
        json.dumps({"post_id": "q6", "text": "Robert\u0000 in Paris", "mentions": [{"mention": "Robert", "start": 0,
                                                                                   "end": 6}]}).encode(),
        json.dumps({"post_id": None, "text": text, "mentions": [{"mention": "Robert", "start": 0, "end": 6}]}).encode(),
        deeply_nested_json_line(),
    ]
    (src / "posts.jsonl").write_bytes(b"\n".join(posts) + b"\n")
    (src / "empty.jsonl").write_bytes(b"")
    pq.write_table(pa.table({"mention_id": pa.array([], pa.string()), "mention": pa.array([], pa.string())}),
                   src / "zero.parquet")
    (src / "fake.parquet").write_bytes(b"PAR1 this is not a parquet file at all")
    # a writer that did not validate its text; a row group damaged in storage (footer intact)
    pq.write_table(pa.table({"mention_id": ["u0", "u1", "u2"], "mention": [good[i]["mention"] for i in range(3)],
                             "text": string_column_with_invalid_utf8([good[0]["text"].encode(), b"\xff\xfe broken",
                                                                      good[2]["text"].encode()])}),
                   src / "badutf8.parquet")
    pq.write_table(pa.table({"mention_id": [f"d{i}" for i in range(6)], "mention": [g["mention"] for g in good[:6]],
                             "text": [g["text"] for g in good[:6]]}), src / "damaged.parquet", row_group_size=2)
    damage_row_group(src / "damaged.parquet", 1)
    # a 200 MB line between two good ones, and a 200 MB text value in a Parquet row group
    with open(src / "giant.jsonl", "wb") as f:
        f.write(json.dumps({"mention_id": "g1", "mention": good[0]["mention"], "text": good[0]["text"]}).encode() + b"\n")
        f.write(b'{"mention_id": "g2", "mention": "x", "text": "')
        for _ in range(GIANT >> 20):
            f.write(b"word " * (1 << 18))  # 1 MiB at a time: the test holds no 200 MB line either
        f.write(b'"}\n' + json.dumps({"mention_id": "g3", "mention": good[1]["mention"], "text": good[1]["text"]}).encode())
    pq.write_table(pa.table({"mention_id": ["h1", "h2"], "mention": [good[2]["mention"], "x"],
                             "text": [good[2]["text"], "w" * GIANT]}), src / "giant.parquet")

    memory = WorkerMemory(since=0, root_pid=os.getpid())  # every worker of the session's instance
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_EVERY_S):
            memory.sample()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = run(LinkConfig(model=model, index=index, input=str(src), output=str(tmp_path / "out"), top_k=3,
                           candidates=16, bad_image="text", **ONE_ACTOR_EACH))
    finally:
        stop.set()
        sampler.join()
    peaks = memory.by_kind()
    assert peaks and max(peaks.values()) < JOB_PROCESS_LIMIT_MB, peaks
    out = read_link_output(r.output).to_pylist()
    assert r.summary["counts"]["in"] == len(out) == 9 + 8 + 1 + 3 + 6 + 3 + 2
    assert all(x["status"] in LINK_STATUSES for x in out)
    assert all(x["error"] for x in out if x["status"] == "error")
    assert all(x["error"] is None for x in out if x["status"] != "error")
    ids = Counter(x["mention_id"] for x in out)
    assert ids[rows[0]["mention_id"]] == 2  # the duplicate comes back as its own row
    by_id = {x["mention_id"]: x for x in out}

    # images: truncated, bomb, non-image -> linked on the text; NUL bytes and 1 MB texts link
    for i in (1, 2, 3, 4, 5):
        row = by_id[rows[i]["mention_id"]]
        assert row["status"] in ("ok", "nil") and row["candidates"], (i, row)
    for i in (6, 8):
        row = by_id[rows[i]["mention_id"]]
        assert row["status"] in ("ok", "nil") or row["error"], (i, row)

    posts_uri = str(src / "posts.jsonl")
    assert by_id[f"{posts_uri}:1"]["error"].startswith("bad_json")
    assert by_id["q2:24-20"]["error"].startswith("bad_span")
    assert by_id["q3:-3-6"]["error"].startswith("bad_span")
    assert by_id["q4"]["error"].startswith("empty_text")
    assert by_id[f"{posts_uri}:5"]["error"].startswith("bad_json")
    assert by_id["q6:0-6"]["status"] in ("ok", "nil")
    assert by_id[f"{posts_uri}:7"]["error"].startswith("missing_id")
    assert by_id[f"{src / 'fake.parquet'}:0"]["error"].startswith("unreadable_file")
    assert by_id[f"{posts_uri}:8"]["error"].startswith("bad_json")  # nested 100k deep
    assert by_id[f"{src / 'badutf8.parquet'}:1"]["error"].startswith("bad_text")
    assert by_id["u0"]["status"] in ("ok", "nil") and by_id["u2"]["status"] in ("ok", "nil")
    damaged = str(src / "damaged.parquet")
    assert [by_id[f"{damaged}:{i}"]["error"].split(":")[0] for i in (2, 3)] == ["unreadable_row_group"] * 2
    assert all(by_id[f"d{i}"]["status"] in ("ok", "nil") for i in (0, 1, 4, 5))
    # the giant line and value are error rows; the rows around them are linked
    assert by_id[f"{src / 'giant.jsonl'}:2"]["error"].startswith("line_too_long: line 2 is")
    assert by_id["h2"]["error"].startswith(f"text_too_long: the text is {GIANT} bytes")
    assert all(by_id[i]["status"] in ("ok", "nil") for i in ("g1", "g3", "h1"))
    # every input file has its output (the empty ones an empty one)
    assert set(r.summary["files"]) == {str(src / n) for n in
                                       ("mentions.parquet", "posts.jsonl", "empty.jsonl", "zero.parquet", "fake.parquet",
                                        "badutf8.parquet", "damaged.parquet", "giant.jsonl", "giant.parquet")}


def test_the_pixel_cap_refuses_a_bomb_before_decoding():
    import resource

    import pytest

    from otmel.io.images import ImageDecodeError, decode_image

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageDecodeError, match="exceeds the cap"):
        decode_image(_bomb_png())
    # decoding would allocate 100 MB before finding the data truncated; refused from the header
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KB
