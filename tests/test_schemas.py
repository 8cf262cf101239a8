"""Data contracts: schema types, required/optional columns, id checks, one-line errors."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from otmel.data.schemas import (
    KB_SCHEMA,
    LINK_OUTPUT_SCHEMA,
    LINK_STATUSES,
    MENTION_SCHEMA,
    POST_SCHEMA,
    SchemaError,
    check_columns,
    conform,
    read_kb,
    read_mentions,
)


def test_contract_types():
    assert KB_SCHEMA.names == ["entity_id", "name", "attributes", "image", "image_uri", "aliases"]
    assert KB_SCHEMA.field("image").type == pa.binary() and KB_SCHEMA.field("image").nullable
    assert KB_SCHEMA.field("aliases").type == pa.list_(pa.string())
    assert MENTION_SCHEMA.names == ["mention_id", "post_id", "mention", "text", "image", "image_uri", "gold_entity_id"]
    span = POST_SCHEMA.field("mentions").type.value_type
    assert [(f.name, f.type) for f in span] == [("mention", pa.string()), ("start", pa.int32()), ("end", pa.int32())]
    assert LINK_OUTPUT_SCHEMA.names == ["mention_id", "post_id", "mention", "start", "end", "entity_id", "score",
                                       "candidates", "status", "error", "warning", "model_version", "index_version"]
    assert LINK_OUTPUT_SCHEMA.field("score").type == pa.float32()
    assert LINK_OUTPUT_SCHEMA.field("start").type == pa.int32()
    candidate = LINK_OUTPUT_SCHEMA.field("candidates").type.value_type
    assert [(f.name, f.type) for f in candidate] == [("entity_id", pa.string()), ("score", pa.float32())]
    assert LINK_STATUSES == ("ok", "nil", "no_mention", "error")


def test_check_columns_names_missing_columns_file_and_kind():
    table = pa.table({"name": ["a"], "image": [None]})
    with pytest.raises(SchemaError) as err:
        check_columns(table, "KB", "s3://bucket/kb.parquet")
    msg = str(err.value)
    assert "\n" not in msg
    assert "s3://bucket/kb.parquet" in msg and "KB" in msg and "entity_id" in msg
    assert "lacks required column(s) entity_id " in msg  # name is present, so not listed as missing
    with pytest.raises(SchemaError, match="mentions table lacks required column.*mention_id, mention"):
        check_columns(pa.schema([("text", pa.string())]), "mentions", "m.parquet")
    check_columns(pa.schema([("entity_id", pa.string()), ("name", pa.string())]), "KB", "kb.parquet")
    check_columns(pa.schema([("post_id", pa.string()), ("text", pa.string())]), "posts", "posts.parquet")
    with pytest.raises(SchemaError, match="link output.*status"):
        check_columns(LINK_OUTPUT_SCHEMA.remove(LINK_OUTPUT_SCHEMA.get_field_index("status")), "link output", "o")
    with pytest.raises(ValueError, match="unknown table kind"):
        check_columns(table, "entities", "x")


def test_read_kb_fills_optional_columns_and_casts(tmp_path):
    path = tmp_path / "kb.parquet"
    pq.write_table(pa.table({"entity_id": [1, 2], "name": ["Robert", "Robert"], "wikidata_label": ["x", "y"]}), path)
    kb = read_kb(path)
    assert kb.schema.names[:6] == KB_SCHEMA.names and kb.schema.names[6:] == ["wikidata_label"]
    for f in KB_SCHEMA:
        assert kb.schema.field(f.name).type == f.type
    assert kb.column("entity_id").to_pylist() == ["1", "2"]  # ints read as string ids
    assert kb.column("attributes").to_pylist() == ["", ""]  # absent attributes: empty text
    assert kb.column("image").to_pylist() == [None, None]
    assert kb.column("image_uri").null_count == 2 and kb.column("aliases").null_count == 2


def test_read_kb_rejects_duplicate_and_null_ids(tmp_path):
    path = tmp_path / "kb.parquet"
    ids = ["Q1", "Q2", "Q2", "Q3", "Q4", "Q4", "Q4"]
    pq.write_table(pa.table({"entity_id": ids, "name": ["n"] * len(ids)}), path)
    with pytest.raises(SchemaError) as err:
        read_kb(path)
    msg = str(err.value)
    assert str(path) in msg and "2 duplicate entity_id" in msg and "'Q2'" in msg and "'Q4'" in msg
    assert "'Q1'" not in msg and "\n" not in msg
    pq.write_table(pa.table({"entity_id": ["Q1", None], "name": ["a", "b"]}), path)
    with pytest.raises(SchemaError, match="1 KB row.*null entity_id"):
        read_kb(path)


def test_read_mentions(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"mention_id": ["m1", "m2"], "mention": ["Robert", "Maria"],
                             "image": pa.array([b"\x89PNG", None], pa.large_binary())}), path)
    m = read_mentions(path)
    assert m.schema.equals(MENTION_SCHEMA)
    assert m.column("text").to_pylist() == ["", ""]
    assert m.column("gold_entity_id").null_count == 2 and m.column("post_id").null_count == 2
    assert m.column("image").to_pylist() == [b"\x89PNG", None]
    pq.write_table(pa.table({"mention_id": ["m1", "m1"], "mention": ["a", "b"]}), path)
    with pytest.raises(SchemaError, match="duplicate mention_id.*'m1'"):
        read_mentions(path)
    pq.write_table(pa.table({"mention_id": pa.array([], pa.string()), "mention": pa.array([], pa.string())}), path)
    assert read_mentions(path).num_rows == 0  # an empty split is the caller's call


def test_uncastable_column_and_bad_files(tmp_path):
    bad = pa.table({"entity_id": ["Q1"], "name": ["a"], "aliases": pa.array([{"x": 1}])})
    with pytest.raises(SchemaError, match="column aliases of type .* cannot be read as list<"):
        conform(bad, "KB", "kb.parquet")
    with pytest.raises(FileNotFoundError, match="no such KB file"):
        read_kb(tmp_path / "missing.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(SchemaError, match="not a readable Parquet file"):
        read_mentions(junk)


# ---------------------------------------------------------------------------- image bytes (the image column)
def _encoded(mode: str, fmt: str, size=(8, 6), **save) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt, **save)
    return buf.getvalue()


def test_decode_image_gives_loaded_rgb():
    from otmel.io.images import decode_image, encode_png

    for mode, fmt in (("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("CMYK", "JPEG")):
        img = decode_image(_encoded(mode, fmt))
        assert img.mode == "RGB" and img.size == (8, 6)
    transparent = decode_image(_encoded("RGBA", "PNG"))  # fully transparent black -> white
    assert transparent.getpixel((0, 0)) == (255, 255, 255)
    png = encode_png(transparent)
    assert decode_image(png).tobytes() == transparent.tobytes()


def test_decode_image_refuses_bad_bytes_with_a_reason():
    from otmel.io.images import ImageDecodeError, decode_image

    jpeg = _encoded("RGB", "JPEG", size=(64, 64))
    cases = {b"": "empty", b"hello world": "not a recognised image format", jpeg[: len(jpeg) // 2]: "cannot decode"}
    for data, reason in cases.items():
        with pytest.raises(ImageDecodeError, match=reason):
            decode_image(data)
    with pytest.raises(ImageDecodeError, match="64x64 pixels exceeds the cap of 1000"):
        decode_image(jpeg, max_pixels=1000)
    assert issubclass(ImageDecodeError, ValueError)


def test_decompression_bomb_is_refused_from_the_header():
    import struct
    import zlib

    from otmel.io.images import ImageDecodeError, decode_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    for side in (8000, 100_000):  # 64M pixels (over our cap), 10G pixels (over Pillow's own limit)
        header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
        with pytest.raises(ImageDecodeError, match="pixels"):
            decode_image(header + chunk(b"IEND", b""))
