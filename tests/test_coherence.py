"""Collective disambiguation with KGE vectors (otmel.linking.coherence): the formula, the commit's
passes over a file's parts, bad embeddings files, and embed -> calibrate -> link end to end
on posts naming several related entities."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ONE_ACTOR_EACH

from otmel.linking.coherence import (EmbeddingsError, EntityVectors, apply_to_rows, load_entity_vectors, post_tops,
                             post_tops_of_table, rescore)


def vectors_of(table: dict[str, list[float]]) -> EntityVectors:
    ids = np.array(sorted(table), dtype="S")
    m = np.array([table[i.decode()] for i in ids], dtype=np.float32)
    return EntityVectors(ids, m / np.linalg.norm(m, axis=1, keepdims=True), "test")


# A and B are related (same direction), C is not; X has no vector
VECS = vectors_of({"A": [1, 0, 0], "A2": [0.9, 0.1, 0], "B": [1, 0.05, 0], "C": [0, 1, 0], "D": [0, 0, 1]})


def test_coherence_moves_the_candidate_related_to_the_other_mentions_top1_up():
    """Mention m1's list is C (0.50) > B (0.45); m2's top-1 is A, close to B: with W = 0.2,
    S(B) = 0.45 + 0.2 * cos(B, A) ~ 0.65 > S(C) = 0.50 + 0.2 * cos(C, A) = 0.50."""
    posts, mentions = ["p", "p"], ["m1", "m2"]
    ids = [["C", "B", "X"], ["A", "D"]]
    scores = [[0.50, 0.45, 0.40], [0.9, 0.1]]
    tops = post_tops(posts, mentions, ids)
    assert tops == {"p": [("m1", "C"), ("m2", "A")]}
    new_ids, new_scores = rescore(posts, mentions, ids, scores, tops, VECS, 0.2)
    assert new_ids[0] == ["B", "C", "X"]
    cos_ba = float(VECS.vectors[VECS.rows(["B"])[0]] @ VECS.vectors[VECS.rows(["A"])[0]])
    assert new_scores[0] == pytest.approx([0.45 + 0.2 * cos_ba, 0.50, 0.40])  # X: no vector, unchanged
    # m2 sees m1's top-1 C (orthogonal to A, parallel to nothing in its list but itself: D is 0)
    assert new_ids[1] == ["A", "D"] and new_scores[1] == pytest.approx([0.9, 0.1])
    # W = 0 changes nothing; a mention alone in its post, or without a post, is unchanged
    assert rescore(posts, mentions, ids, scores, tops, VECS, 0.0) == (ids, [[float(s) for s in r] for r in scores])
    alone = rescore(["q", None], ["m1", "m3"], ids, scores, post_tops(["q", None], ["m1", "m3"], ids), VECS, 5.0)
    assert alone[0] == (ids, [[float(s) for s in r] for r in scores])[0]


def test_coherence_averages_over_the_other_mentions_and_excludes_the_mention_itself():
    posts, mentions = ["p"] * 3, ["m1", "m2", "m3"]
    ids = [["A2", "C"], ["A"], ["D"]]
    tops = post_tops(posts, mentions, ids)
    _, scores = rescore(posts, mentions, ids, [[0.0, 0.0], [0.0], [0.0]], tops, VECS, 1.0)
    unit = lambda e: VECS.vectors[VECS.rows([e])[0]]  # noqa: E731
    # m1's A2: mean of cos(A2, A) and cos(A2, D), never cos(A2, A2) (its own top-1)
    assert scores[0][0] == pytest.approx((unit("A2") @ unit("A") + unit("A2") @ unit("D")) / 2)


def _rows(entries):
    """Link output rows from (mention, post, [(entity, score)], status)."""
    from otmel.data.schemas import LINK_OUTPUT_SCHEMA

    rows = []
    for m, p, cands, status in entries:
        top = cands[0] if cands else (None, None)
        rows.append({"mention_id": m, "post_id": p, "mention": m, "start": None, "end": None,
                     "entity_id": top[0] if status == "ok" else None, "score": top[1],
                     "candidates": [{"entity_id": e, "score": s} for e, s in cands] if status in ("ok", "nil") else None,
                     "status": status, "error": "bad_image: x" if status == "error" else None,
                     "model_version": "v", "index_version": "i"})
    return pa.Table.from_pylist(rows, schema=LINK_OUTPUT_SCHEMA)


def test_apply_to_rows_rescores_ok_and_nil_rows_and_decides_nil_again():
    t = _rows([("m1", "p", [("C", 0.50), ("B", 0.45)], "ok"), ("m2", "p", [("A", 0.9)], "ok"),
               ("m3", "p", [("D", 0.30), ("B", 0.29)], "nil"), ("m4", "p", [], "error")])
    # m1: B gains 0.2 * mean(cos(B, A), cos(B, D)) ~ 0.1, C gains 0 (its others' top-1s are A and D)
    out = apply_to_rows(t, post_tops_of_table(t), VECS, 0.2, nil_threshold=0.38)
    rows = out.to_pylist()
    assert [c["entity_id"] for c in rows[0]["candidates"]] == ["B", "C"] and rows[0]["entity_id"] == "B"
    assert rows[0]["score"] == pytest.approx(rows[0]["candidates"][0]["score"])
    assert rows[2]["status"] == "ok" and rows[2]["entity_id"] == "B"  # 0.29 + 0.2 * ~0.52 >= 0.38: now linked
    assert rows[3] == t.to_pylist()[3]  # an error row is untouched
    low = apply_to_rows(t, post_tops_of_table(t), VECS, 0.2, nil_threshold=0.7).to_pylist()
    assert low[0]["status"] == "nil" and low[0]["entity_id"] is None and low[0]["candidates"][0]["entity_id"] == "B"


def test_commit_with_coherence_groups_a_post_across_parts_and_counts_what_it_writes(tmp_path):
    """A post's mentions in different staged parts (a mentions file need not keep a post's
    rows together) still see each other; the footer's counts are those of the rows written."""
    from otmel.linking.link_output import commit_output_file, read_link_output, read_output_meta, write_part

    src = "file:///in/posts.parquet"
    first = _rows([("m1", "p", [("C", 0.50), ("B", 0.45)], "nil"), ("m9", "q", [("D", 0.2)], "nil")])
    second = _rows([("m2", "p", [("A", 0.9)], "ok")])
    parts = []
    for k, t in enumerate((first, second)):
        t = t.append_column("source_row", pa.array([k * 10 + i for i in range(t.num_rows)], pa.int64()))
        parts.append(write_part(t, str(tmp_path / "out"), src))
    meta = commit_output_file(parts, str(tmp_path / "out"), src, {"input": src}, vectors=VECS,
                              coherence={"weight": 0.2, "nil_threshold": 0.6})
    out = {r["mention_id"]: r for r in read_link_output(str(tmp_path / "out")).to_pylist()}
    assert out["m1"]["entity_id"] == "B" and out["m1"]["status"] == "ok"  # 0.45 + 0.2 cos(B, A) > 0.6
    assert out["m9"]["status"] == "nil"  # alone in post q
    assert meta["counts"]["ok"] == 2 and meta["counts"]["nil"] == 1
    written = read_output_meta(str(next((tmp_path / "out").glob("part-*.parquet"))))
    assert written["counts"] == meta["counts"]


@pytest.mark.parametrize("table, message", [
    ({"entity_id": ["a", "a"], "vector": [[1.0, 0.0], [0.0, 1.0]]}, "duplicate entity_id"),
    ({"entity_id": ["a", "b"], "vector": [[1.0, 0.0], [0.0, 1.0, 2.0]]}, "different lengths"),
    ({"entity_id": ["a", "b"], "vector": [[1.0, float("nan")], [0.0, 1.0]]}, "NaN or inf"),
    ({"entity_id": ["a", "b"], "embedding": [[1.0, 0.0], [0.0, 1.0]]}, "missing \\['vector'\\]"),
    ({"entity_id": ["a", None], "vector": [[1.0, 0.0], [0.0, 1.0]]}, "without an entity_id"),
])
def test_bad_embeddings_files_are_clear_errors(tmp_path, table, message):
    path = tmp_path / "emb.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(EmbeddingsError, match=message):
        load_entity_vectors(str(path))


def test_zero_vectors_are_dropped_and_missing_files_named(tmp_path, caplog):
    path = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"entity_id": ["b", "a", "z"], "vector": [[0.0, 2.0], [3.0, 0.0], [0.0, 0.0]]}), path)
    v = load_entity_vectors(str(path))
    assert len(v) == 2 and v.rows(["a", "b", "z", None, "abc"]).tolist() == [0, 1, -1, -1, -1]
    assert np.allclose(v.vectors, [[1, 0], [0, 1]])
    assert "1 all-zero KGE vector(s) dropped" in caplog.text
    with pytest.raises(EmbeddingsError, match="no such KGE embeddings file"):
        load_entity_vectors(str(tmp_path / "nope.parquet"))


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def related(synth_dir, tmp_path_factory):
    """Posts of 2-3 related mentions over the session KB, its team KG, and KGE vectors
    trained on that KG with ``otmel kge train`` / ``embed``."""
    from otmel.cli.main import main
    from otmel.data.synth_posts import write_related_posts

    root = tmp_path_factory.mktemp("related")
    counts = write_related_posts(synth_dir / "kb.parquet", root / "data", n_posts=240, team_size=4, seed=3)
    assert main(["kge", "train", "--triples", str(root / "data" / "triples"), "--out", str(root / "kge"),
                 "--dim", "32", "--epochs", "60", "--batch-size", "200", "--eval-every", "0"]) == 0
    assert main(["kge", "embed", "--checkpoint", str(root / "kge"), "--out", str(root / "emb.parquet"),
                 "--kb", str(synth_dir / "kb.parquet")]) == 0
    ids = pq.read_table(root / "emb.parquet").column("entity_id").to_pylist()
    kb_ids = pq.read_table(synth_dir / "kb.parquet").column("entity_id").to_pylist()
    assert sorted(ids) == sorted(kb_ids)  # the team nodes (KG only) are left out
    return root, counts


def _h1(out_dir, gold: dict[str, str]) -> float:
    from otmel.linking.link_output import read_link_output

    rows = read_link_output(out_dir).to_pylist()
    assert len(rows) == len(gold)
    return sum(r["entity_id"] == gold[r["mention_id"]] for r in rows) / len(rows)


def test_embed_calibrate_link_with_coherence_raises_h1_on_posts_of_related_entities(related, onnx_model, s3_index,
                                                                                 tmp_path, s3_server, capsys,
                                                                                 record_property):
    """KGE vectors from the posts' KG: calibrate picks W > 0 on dev, and the link job with
    --kge-embeddings (the calibrated W) gets a clearly higher top-1 accuracy on test posts
    than without. The footers count the statuses written."""
    from otmel.cli.main import main
    from otmel.jobs.link import LinkConfig, run
    from otmel.linking.link_output import read_link_output

    root, counts = related
    model = tmp_path / "model"
    shutil.copytree(onnx_model, model)
    emb = str(root / "emb.parquet")
    assert main(["calibrate", "--model", str(model), "--index", s3_index[0].out, "--data", str(root / "data"),
                 "--kge-embeddings", emb, "--top-k", "10", "--s3-endpoint", s3_server]) == 0
    printed = capsys.readouterr().out
    assert "coherence weight" in printed
    stored = json.loads((model / "export.json").read_text())["coherence"]
    assert stored["weight"] > 0 and stored["top_k"] == 10
    test = pq.read_table(root / "data" / "mentions" / "test.parquet")
    gold = dict(zip(test.column("mention_id").to_pylist(), test.column("gold_entity_id").to_pylist()))
    common = dict(model=str(model), index=s3_index[0].out, input=str(root / "data" / "mentions" / "test.parquet"),
                  top_k=10, candidates=20, nil_threshold=-1e9, batch_size=16, s3_endpoint=s3_server, **ONE_ACTOR_EACH)
    base = run(LinkConfig(output=str(tmp_path / "base"), **common))
    coh = run(LinkConfig(output=str(tmp_path / "coh"), kge_embeddings=emb, **common))
    h1_base, h1_coh = _h1(base.output, gold), _h1(coh.output, gold)
    print(f"test posts: H@1 without coherence {h1_base:.3f}, with {h1_coh:.3f} (W {stored['weight']:.3g})")
    record_property("h1_without_coherence", round(h1_base, 3))
    record_property("h1_with_coherence", round(h1_coh, 3))
    assert h1_coh >= h1_base + 0.1, (h1_base, h1_coh)
    assert coh.summary["coherence"]["version"] == stored["embeddings_version"]
    assert coh.summary["coherence"]["weight"] == stored["weight"]
    rows = read_link_output(coh.output)
    statuses = dict(zip(*np.unique(rows.column("status").to_pylist(), return_counts=True)))
    assert coh.summary["counts"]["ok"] == statuses.get("ok", 0) == len(gold)
    # a re-run with another weight recomputes; the same settings skip
    again = run(LinkConfig(output=str(tmp_path / "coh"), kge_embeddings=emb, **common))
    assert again.summary["files_skipped_complete"] == 1
    other = run(LinkConfig(output=str(tmp_path / "coh"), kge_embeddings=emb, coherence_weight=0.0, **common))
    assert other.summary["files_processed"] == 1 and _h1(other.output, gold) == pytest.approx(h1_base)


def test_link_refuses_embeddings_without_a_calibrated_weight(related, onnx_model, s3_index, tmp_path, s3_server):
    from otmel.jobs.link import LinkConfig, preflight

    root, _ = related
    cfg = LinkConfig(model=onnx_model, index=s3_index[0].out, input=str(root / "data" / "mentions" / "test.parquet"),
                     output=str(tmp_path / "o"), kge_embeddings=str(root / "emb.parquet"), s3_endpoint=s3_server)
    with pytest.raises(ValueError, match="no coherence weight calibrated for .*emb.parquet"):
        preflight(cfg)
    with pytest.raises(ValueError, match="--coherence-weight needs --kge-embeddings"):
        LinkConfig(model="m", index="i", input="x", output="o", coherence_weight=1.0)
