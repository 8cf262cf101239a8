"""The MIMIC release importer, on small releases written here in the release's format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from otmel.io.images import decode_image
from otmel.data.mimic import attributes_text, import_mimic, locate_release
from otmel.data.schemas import KB_SCHEMA, MENTION_SCHEMA, read_kb, read_mentions


def _jpeg(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def _write_release(root: Path, prefix: str = "WIKIMEL", mention_dir: str = "mention_image") -> dict[str, bytes]:
    """A tiny release: 5 KB entities (one only reachable through qid2id.json, one URL-quoted
    name, one image missing, one corrupt, one without images) and mentions in every split
    (one nil answer, one unknown gold, one missing and one corrupt mention image)."""
    root.mkdir(parents=True)
    (root / "kb_image").mkdir()
    (root / mention_dir).mkdir()
    images = {"Q1": _jpeg((200, 0, 0)), "Q5": _jpeg((0, 0, 200)), "m1": _jpeg((0, 200, 0)), "m4": _jpeg((9, 9, 9))}
    (root / "kb_image" / "Q1_0.jpg").write_bytes(images["Q1"])
    (root / "kb_image" / "Q3_0.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "kb_image" / "Q5_a.jpg").write_bytes(images["Q5"])
    (root.parent / "outside.jpg").write_bytes(images["Q1"])  # must never be read
    # mention images were converted to JPEG: imgPath ".../post1.png" lives at post1.jpg
    (root / mention_dir / "post1.jpg").write_bytes(images["m1"])
    (root / mention_dir / "post3.jpg").write_bytes(images["m1"][:40])  # truncated
    (root / mention_dir / "post4.jpg").write_bytes(images["m4"])

    kb = [
        {"id": 0, "qid": "Q1", "type": "entity", "entity_name": "Robert%20Downey%20Jr.",
         "attr": "occupation: actor. country of citizenship: United States of America.", "image_list": ["Q1_0.jpg"]},
        {"id": 1, "qid": "Q2", "type": "entity", "entity_name": "Robert Smith",
         "attr": "occupation: singer.", "image_list": ["Q2_0.jpg"]},  # file absent
        {"id": 2, "qid": "Q3", "type": "entity", "entity_name": "Robert Plant",
         "attr": "", "image_list": ["Q3_0.jpg"]},  # corrupt file
        {"id": 3, "qid": "Q4", "type": "entity", "entity_name": "Robert Walpole",
         "attr": "position held: prime minister.", "image_list": ["../../outside.jpg"]},  # escapes the folder
        {"id": 4, "type": "entity", "entity_name": "Robert Koch",  # QID only via qid2id.json
         "attr": "occupation: physician.", "image_list": ["Q5_a.jpg"]},
        {"id": 5, "qid": "Q1", "type": "entity", "entity_name": "duplicate", "attr": "", "image_list": []},
        {"id": 6, "qid": "Q6", "type": "entity", "entity_name": "Robert Frost", "attr": "", "image_list": []},
    ]
    (root / "kb_entity.json").write_text(json.dumps(kb))
    (root / "qid2id.json").write_text(json.dumps({"Q1": 0, "Q2": 1, "Q3": 2, "Q4": 3, "Q5": 4, "Q6": 6}))

    def mention(i, name, sentence, img, answer):
        return {"id": f"{prefix}-{i}", "mentions": name, "entities": name, "sentence": sentence,
                "imgPath": img, "answer": answer}

    splits = {
        "train": [
            mention(1, "Robert%20Downey%20Jr.", "Robert Downey Jr. at the premiere.", "wiki/a/post1.png", "Q1"),
            mention(2, "Robert", "Robert waves to the crowd.", "post2.jpg", "Q2"),  # image missing
            mention(3, "somebody", "An unlinkable person.", "", "nil"),
        ],
        "dev": [
            mention(4, "Plant", "Plant sings.", "post3.jpg", "Q3"),  # corrupt image
            mention(5, "Koch", "Koch in his lab.", "", "Q999"),  # gold not in the KB
        ],
        "test": [
            mention(6, "Koch", "Koch in his lab.", "", "Q5"),
            mention(7, "Frost", "Frost reads a poem.", "post4.jpg", "Q6"),
        ],
    }
    for split, records in splits.items():
        (root / f"{prefix}_{split}.json").write_text(json.dumps(records))
    return images


@pytest.fixture
def wikimel(tmp_path):
    root = tmp_path / "release" / "WikiMEL"
    images = _write_release(root)
    out = tmp_path / "out"
    report = import_mimic(root, "wikimel", out, workers=2)
    return root, out, report, images


def test_counts(wikimel):
    _, _, report, _ = wikimel
    assert report.entities == 6  # 7 records, one duplicate QID
    assert report.duplicate_entities_skipped == 1
    assert report.entities_with_image == 2  # Q1 and Q5
    assert report.kb_images_missing == 2  # Q2 absent, Q4 outside the image folder
    assert report.kb_images_unreadable == 1  # Q3 corrupt
    assert report.mentions == {"train": 2, "dev": 1, "test": 2}
    assert report.nil_skipped == 1
    assert report.unknown_gold_skipped == 1
    assert report.malformed_skipped == 0
    assert report.mentions_with_image == 2  # post1 and post4
    assert report.mention_images_missing == 1  # post2
    assert report.mention_images_unreadable == 1  # post3 truncated
    assert report.images_missing == 3 and report.images_unreadable == 2
    assert "1 nil" in str(report)


def test_converted_values(wikimel):
    _, out, _, images = wikimel
    kb = read_kb(out / "kb.parquet")
    assert kb.schema.equals(KB_SCHEMA)
    rows = {r["entity_id"]: r for r in kb.to_pylist()}
    assert list(rows) == ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6"]
    assert rows["Q1"]["name"] == "Robert Downey Jr."  # URL-unquoted
    assert rows["Q1"]["attributes"] == "occupation: actor. country of citizenship: United States of America."
    assert rows["Q1"]["image"] == images["Q1"]  # the file's bytes, as is
    assert rows["Q5"]["name"] == "Robert Koch" and rows["Q5"]["image"] == images["Q5"]  # QID via qid2id.json
    assert all(rows[q]["image"] is None for q in ("Q2", "Q3", "Q4", "Q6"))
    assert rows["Q1"]["image_uri"] is None and rows["Q1"]["aliases"] is None

    mentions = {s: read_mentions(out / "mentions" / f"{s}.parquet") for s in ("train", "dev", "test")}
    for table in mentions.values():
        assert table.schema.equals(MENTION_SCHEMA)
    train = mentions["train"].to_pylist()
    assert [m["mention_id"] for m in train] == ["WIKIMEL-1", "WIKIMEL-2"]
    first = train[0]
    assert first["mention"] == "Robert Downey Jr." and first["text"] == "Robert Downey Jr. at the premiere."
    assert first["gold_entity_id"] == "Q1" and first["image"] == images["m1"]  # post1.png -> post1.jpg
    assert decode_image(first["image"]).size == (16, 16)
    assert train[1]["image"] is None
    assert mentions["dev"].column("image").to_pylist() == [None]
    test = mentions["test"].to_pylist()
    assert [m["gold_entity_id"] for m in test] == ["Q5", "Q6"]
    assert test[1]["image"] == images["m4"]
    all_ids = [m for t in mentions.values() for m in t.column("mention_id").to_pylist()]
    assert len(set(all_ids)) == len(all_ids)
    assert all(p.startswith("post-") for t in mentions.values() for p in t.column("post_id").to_pylist())
    assert not list(out.rglob("*.tmp"))


def test_parent_root_other_layout_and_fallback_ids(tmp_path):
    """RichpediaMEL: split files named RichpediaMEL_*.json, images in mention_images/, the
    root given as the release's parent; duplicate record ids -> split-position ids."""
    parent = tmp_path / "data"
    _write_release(parent / "RichpediaMEL", prefix="RichpediaMEL", mention_dir="mention_images")
    dev = parent / "RichpediaMEL" / "RichpediaMEL_dev.json"
    records = json.loads(dev.read_text())
    records[1]["id"] = "RichpediaMEL-1"  # clashes with a train id
    dev.write_text(json.dumps(records))
    report = import_mimic(parent, "richpediamel", tmp_path / "out")
    assert report.mentions == {"train": 2, "dev": 1, "test": 2} and report.mentions_with_image == 2
    ids = pq.read_table(tmp_path / "out" / "mentions" / "test.parquet").column("mention_id").to_pylist()
    assert ids == ["test-0", "test-1"]


def test_missing_files_are_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        import_mimic(tmp_path / "nowhere", "wikimel", tmp_path / "out")
    root = tmp_path / "WikiDiverse"
    root.mkdir()
    (root / "wiki_diverse_train.json").write_text("[]")
    with pytest.raises(FileNotFoundError) as err:
        import_mimic(root, "wikidiverse", tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and str(root) in msg
    assert "kb_entity.json" in msg and "wiki_diverse_dev.json" in msg and "wiki_diverse_test.json" in msg
    assert "wiki_diverse_train.json," not in msg
    (root / "kb_entity.json").write_text("{not json")
    for split in ("dev", "test"):
        (root / f"wiki_diverse_{split}.json").write_text("[]")
    with pytest.raises(ValueError, match="kb_entity.json: not valid JSON"):
        import_mimic(root, "wikidiverse", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown dataset"):
        locate_release(root, "weibomel")  # type: ignore[arg-type]


def test_malformed_records_are_counted(tmp_path):
    root = tmp_path / "WikiMEL"
    _write_release(root)
    train = root / "WIKIMEL_train.json"
    records = json.loads(train.read_text())
    del records[0]["sentence"]
    train.write_text(json.dumps(records))
    report = import_mimic(root, "wikimel", tmp_path / "out")
    assert report.malformed_skipped == 1 and report.mentions["train"] == 1


def test_attribute_forms():
    assert attributes_text("a: b. c: d.") == "a: b. c: d."
    assert attributes_text(["occupation actor.", "country france"]) == "occupation actor. country france."
    assert attributes_text({"occupation": ["actor", "singer"], "country": "France"}) == \
        "occupation: actor, singer. country: France."
    assert attributes_text(None) == "" and attributes_text([]) == ""
