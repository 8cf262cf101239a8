"""The synthetic dataset: contract, determinism, ambiguity, and that both modalities carry
signal that no single cue fully resolves (non-learned baselines)."""

from __future__ import annotations

import io
import re
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from otmel.data.schemas import KB_SCHEMA, MENTION_SCHEMA, read_kb, read_mentions
from otmel.data.synth import MAX_CONTEXT_WORDS, SLOTS, SYNTH_VOCABULARY, write_synthetic_dataset

N_ENTITIES = 1500
N_MENTIONS = 3000
SPLITS = ("train", "dev", "test")
LABELS = {label for label, _ in SLOTS}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    report = write_synthetic_dataset(out, n_entities=N_ENTITIES, n_mentions=N_MENTIONS, seed=7)
    kb = read_kb(out / "kb.parquet")
    mentions = pa.concat_tables([read_mentions(out / "mentions" / f"{s}.parquet") for s in SPLITS])
    return out, report, kb.to_pylist(), mentions.to_pylist()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32).ravel()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _expected_hit(scores: list[float], gold: int) -> float:
    """Expected H@1 of an argmax with random tie-breaking."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return 1.0 / len(tied) if gold in tied else 0.0


def test_files_follow_the_contract(dataset):
    out, report, kb, mentions = dataset
    assert pq.read_schema(out / "kb.parquet").equals(KB_SCHEMA, check_metadata=False)
    for split in SPLITS:
        assert pq.read_schema(out / "mentions" / f"{split}.parquet").equals(MENTION_SCHEMA, check_metadata=False)
    assert len(kb) == report.entities == N_ENTITIES
    assert sum(report.mentions.values()) == len(mentions) == N_MENTIONS
    assert report.mentions["train"] == int(0.7 * N_MENTIONS)
    assert all(e["image_uri"] is None for e in kb) and all(m["image_uri"] is None for m in mentions)
    assert all(e["attributes"].count(".") == len(SLOTS) for e in kb)


def test_ids_unique_and_gold_in_kb(dataset):
    _, _, kb, mentions = dataset
    ids = [e["entity_id"] for e in kb]
    assert len(set(ids)) == len(ids)
    mention_ids = [m["mention_id"] for m in mentions]
    assert len(set(mention_ids)) == len(mention_ids)
    assert all(isinstance(m["post_id"], str) and m["post_id"] for m in mentions)
    assert {m["gold_entity_id"] for m in mentions} <= set(ids)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    paths = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_synthetic_dataset(tmp_path / name, n_entities=40, n_mentions=60, seed=seed)
        paths.append(tmp_path / name)
    files = ["kb.parquet"] + [f"mentions/{s}.parquet" for s in SPLITS]
    for f in files:
        assert (paths[0] / f).read_bytes() == (paths[1] / f).read_bytes(), f
    assert (paths[0] / "kb.parquet").read_bytes() != (paths[2] / "kb.parquet").read_bytes()


def test_image_null_rates_near_targets(dataset):
    _, report, kb, mentions = dataset
    kb_missing = np.mean([e["image"] is None for e in kb])
    mention_missing = np.mean([m["image"] is None for m in mentions])
    assert abs(kb_missing - 0.4) < 0.05
    assert abs(mention_missing - 0.1) < 0.03
    assert report.entities_without_image == sum(e["image"] is None for e in kb)
    assert report.mentions_without_image == sum(m["image"] is None for m in mentions)


def test_custom_rates_and_image_size(tmp_path):
    write_synthetic_dataset(tmp_path, n_entities=200, n_mentions=200, seed=1, image_size=24,
                            missing_image_rate=0.0, mention_missing_image_rate=0.0)
    kb = pq.read_table(tmp_path / "kb.parquet").to_pylist()
    test = pq.read_table(tmp_path / "mentions" / "test.parquet").to_pylist()
    assert all(e["image"] is not None for e in kb) and all(m["image"] is not None for m in test)
    for row in kb[:5] + test[:5]:
        img = Image.open(io.BytesIO(row["image"]))
        assert img.format == "PNG" and img.size == (24, 24)


def test_names_are_ambiguous(dataset):
    _, report, kb, _ = dataset
    per_name = defaultdict(int)
    for e in kb:
        per_name[e["name"]] += 1
    assert max(per_name.values()) >= 5
    assert report.max_entities_per_name == max(per_name.values())
    assert 7 <= np.mean(list(per_name.values())) <= 11  # ~1 name per 9 entities
    # the combination (name, attributes) is unique: namesakes differ in their attributes
    assert len({(e["name"], e["attributes"]) for e in kb}) == len(kb)
    assert any(e["aliases"] for e in kb) and any(e["aliases"] is None for e in kb)


def test_vocabulary_covers_every_word(dataset):
    _, _, kb, mentions = dataset
    used: set[str] = set()
    for e in kb:
        used |= _words(e["name"]) | _words(e["attributes"]) | _words(" ".join(e["aliases"] or []))
    for m in mentions:
        used |= _words(m["mention"]) | _words(m["text"])
    assert used <= set(SYNTH_VOCABULARY), sorted(used - set(SYNTH_VOCABULARY))
    # short enough that "{mention} [SEP] {context}" fits a 24-token text window whole
    assert max(len(m["text"].split()) for m in mentions) <= MAX_CONTEXT_WORDS
    assert max(len(m["mention"].split()) for m in mentions) <= 2
    assert all(w == w.lower() and w.isalpha() for w in SYNTH_VOCABULARY)


def test_baselines_show_both_modalities_carry_signal_and_neither_suffices(dataset):
    """Among the gold's namesakes (same name): raw-pixel nearest neighbour and attribute-word
    overlap are each far above chance but not perfect, and every mention has at least one
    decisive cue; the mention string alone, over the whole KB, is at chance among namesakes."""
    _, _, kb, mentions = dataset
    by_name = defaultdict(list)
    for e in kb:
        by_name[e["name"]].append(e)
    entity = {e["entity_id"]: e for e in kb}
    entity_pixels = {e["entity_id"]: _pixels(e["image"]) for e in kb if e["image"] is not None}
    row_of = {e["entity_id"]: i for i, e in enumerate(kb)}
    name_index = defaultdict(list)  # word of a name or alias -> KB rows
    for i, e in enumerate(kb):
        for w in _words(" ".join([e["name"]] + (e["aliases"] or []))):
            name_index[w].append(i)

    chance, text_hits, image_hits, name_hits, image_overall = [], [], [], [], []
    for m in mentions:
        gold = entity[m["gold_entity_id"]]
        namesakes = by_name[gold["name"]]
        chance.append(1.0 / len(namesakes))
        context = _words(m["text"])
        overlap = [len(context & (_words(c["attributes"]) - LABELS)) for c in namesakes]
        text_hits.append(_expected_hit(overlap, namesakes.index(gold)))
        image_decides = m["image"] is not None and gold["image"] is not None
        if image_decides:
            with_image = [c for c in namesakes if c["image"] is not None]
            query = _pixels(m["image"])
            sims = [-float(np.linalg.norm(query - entity_pixels[c["entity_id"]])) for c in with_image]
            image_hits.append(_expected_hit(sims, with_image.index(gold)))
        image_overall.append(image_hits[-1] if image_decides else 1.0 / len(namesakes))
        # every mention can be linked by at least one modality
        assert image_decides or overlap[namesakes.index(gold)] >= 1
        # name-only scorer over the whole KB: word overlap of the mention with name + aliases
        name_scores = np.zeros(len(kb))
        for w in _words(m["mention"]):
            name_scores[name_index[w]] += 1
        name_hits.append(_expected_hit(name_scores.tolist(), row_of[gold["entity_id"]]))

    chance_h1 = float(np.mean(chance))
    text_h1, image_h1 = float(np.mean(text_hits)), float(np.mean(image_hits))
    assert chance_h1 < 0.15
    assert 0.6 < text_h1 < 0.9  # text: strong, but uninformative or misleading contexts exist
    assert image_h1 > 0.9  # image: decisive when both sides have one ...
    assert float(np.mean(image_overall)) < 0.75  # ... which is not always
    # the mention string alone: about chance among namesakes (an alias such as "dr king" tells
    # a little more than the plain name)
    assert float(np.mean(name_hits)) < min(0.2, 1.5 * chance_h1)
