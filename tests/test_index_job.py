"""otmel index: sharded FAISS + memory-mapped features on S3, manifest checks, --update == rebuild."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import ONE_ENCODE_ACTOR, scratch_dirs

from otmel.linking.entity_index import STORED_FEATURES, index_version_of, open_shards, shard_of, storage_dtype
from otmel.jobs.index import IndexConfig, run
from otmel.model.otmel import KEY_FEATURES
from otmel.model.preprocessing import MODEL_INPUTS


def test_s3_index_partitions_the_kb_with_verified_checksums(s3_index, synth_dir, s3_server, onnx_model):
    from otmel.backend import load_backend
    from otmel.io.storage import local_copy

    cfg, result = s3_index
    kb_ids = pq.read_table(synth_dir / "kb.parquet").column("entity_id").to_pylist()
    with local_copy(cfg.out, s3_server) as d:
        manifest, shards = open_shards(d, verify=True)  # every file's sha256 checked
        raw = json.loads((d / "manifest.json").read_text())
        ids = [list(s.entity_ids) for s in shards]
        # each entity in exactly one shard, the one its id hashes to
        assert sorted(i for part in ids for i in part) == sorted(kb_ids)
        for n, part in enumerate(ids):
            assert set(shard_of(part, 2)) <= {n}
        assert manifest["count"] == len(kb_ids) and [s.count for s in shards] == [len(p) for p in ids]
        assert manifest["model_version"] == load_backend(onnx_model).model_version
        assert result.index_version == index_version_of(raw)
        # features memory-mapped, fp16 for reranking; the stage-1 key is stored once, in FAISS
        # (--factory auto: SQfp16, which holds the keys of fp16 features exactly), and its
        # features (fused, summaries) are served from it: no file holds them again
        assert manifest["factory"] == "SQfp16" and manifest["retrieval_key"] == {"layout": "zeros", "in_faiss": True}
        assert set(manifest["dims"]) == set(STORED_FEATURES)
        s = shards[0]
        assert isinstance(s.features["text_query"], np.memmap) and s.features["text_query"].dtype == np.float16
        for entry in raw["shards"]:
            assert set(entry["files"]) == {"index.faiss", "entity_ids.parquet"} | {
                f"{n}.bin" for n in STORED_FEATURES if n not in KEY_FEATURES}
        # the keys FAISS searches are the model's keys of these entities, in fp16
        backend = load_backend(onnx_model)
        kb = pq.read_table(synth_dir / "kb.parquet")
        rows = {e: i for i, e in enumerate(kb_ids)}
        eb = backend.preprocessor.entities(kb.select(["name", "attributes", "image"]).to_pydict())
        fresh = backend.encode({k: getattr(eb, k) for k in MODEL_INPUTS}, ("retrieval_key",))["retrieval_key"]
        keys = s.index.reconstruct_batch(np.arange(s.count))
        assert np.allclose(keys, fresh[[rows[e] for e in s.entity_ids]], atol=2e-3)
        assert np.array_equal(keys, keys.astype(np.float16).astype(np.float32))
        # bytes per entity: the stored features' rows and FAISS's fp16 keys, nothing twice
        per_row = sum(np.prod(manifest["dims"][n]) * storage_dtype(n, "fp16").itemsize
                      for n in STORED_FEATURES if n not in KEY_FEATURES) + 2 * manifest["retrieval_dim"]
        on_disk = sum(p.stat().st_size for e in raw["shards"] for p in (d / e["dir"]).iterdir()
                      if p.name != "entity_ids.parquet")
        assert per_row * manifest["count"] <= on_disk <= per_row * manifest["count"] + 1024 * len(shards)
        aliases = pq.read_table(d / "aliases.parquet")
        assert set(aliases.column("entity_id").to_pylist()) == set(kb_ids)


def test_index_refuses_existing_output_bad_factories_and_bad_kb(ray_local, onnx_model, synth_dir, tmp_path):
    from otmel.data.schemas import SchemaError

    base = dict(model=onnx_model, kb=str(synth_dir / "kb.parquet"))
    with pytest.raises(ValueError, match="FAISS factory 'NoSuchIndex'"):
        run(IndexConfig(out=str(tmp_path / "a"), factory="NoSuchIndex", **base))
    with pytest.raises(ValueError, match="cannot be trained"):
        run(IndexConfig(out=str(tmp_path / "b"), factory="IVF4096,Flat", **base))
    assert not (tmp_path / "b" / "manifest.json").exists()  # nothing half-written is loadable
    # an output that cannot be written is found before any work, not when the first shard is uploaded
    from otmel.io.storage import StorageError

    (tmp_path / "afile").write_text("a file where the index's parent directory should be")
    with pytest.raises(StorageError, match="--out .*afile/e is not writable"):
        run(IndexConfig(out=str(tmp_path / "afile" / "e"), **base))
    kb = pq.read_table(synth_dir / "kb.parquet")
    dup = pa.concat_tables([kb, kb.slice(0, 1)])
    pq.write_table(dup, tmp_path / "dup.parquet")
    with pytest.raises(SchemaError, match="duplicate entity_id"):
        run(IndexConfig(model=onnx_model, kb=str(tmp_path / "dup.parquet"), out=str(tmp_path / "c")))
    with pytest.raises(FileNotFoundError, match="no KB Parquet"):
        run(IndexConfig(model=onnx_model, kb=str(tmp_path / "nothing-here"), out=str(tmp_path / "d")))


def _footer_readers_started() -> int:
    """Ray Data footer-reader actors this Ray instance has seen (the GCS's actor table)."""
    from ray._private.state import actors

    return sum("FooterReader" in a["ActorClassName"] for a in actors().values())


def test_a_kb_of_a_few_files_is_listed_by_one_footer_reader_and_undecodable_rows_are_skipped_and_counted(
        ray_local, onnx_model, synth_dir, tmp_path, monkeypatch):
    """Ray Data lists Parquet through 32 footer-reader actors by default, a Ray worker process
    each: a KB directory of two files needs one (an index build of the synth KB: 6 -> 3 s).
    The second file holds a name, an attributes value and an alias that are not valid UTF-8
    (one such name used to fail the whole build: exit 1 after retries, 4 Ray tracebacks): the two
    entities with bad text are skipped and counted in the manifest, the bad alias is left out of
    the alias table, every other entity is indexed."""
    from hostile_files import string_column_with_invalid_utf8

    from otmel.jobs.index import FOOTER_READERS_ENV, footer_readers

    assert [footer_readers(n) for n in (1, 128, 129, 10**6)] == [1, 1, 2, 32]
    monkeypatch.delenv(FOOTER_READERS_ENV, raising=False)
    kb = pq.read_table(synth_dir / "kb.parquet")
    (tmp_path / "kb").mkdir()
    half = kb.num_rows // 2
    pq.write_table(kb.slice(0, half), tmp_path / "kb" / "a.parquet")
    b = kb.slice(half)
    names = [v.encode() for v in b.column("name").to_pylist()]
    attributes = [(v or "").encode() for v in b.column("attributes").to_pylist()]
    names[0], attributes[1] = b"\xff\xfe broken", b"caf\xc3"
    alias_values = list(names)
    alias_values[2] = b"\xff alias"  # an entity whose text is fine but for one alias
    aliases = pa.ListArray.from_arrays(pa.array(list(range(b.num_rows + 1)), pa.int32()),
                                       string_column_with_invalid_utf8(alias_values))
    for column, values in (("name", string_column_with_invalid_utf8(names)),
                           ("attributes", string_column_with_invalid_utf8(attributes))):
        b = b.set_column(b.column_names.index(column), column, values)
    b = b.set_column(b.column_names.index("aliases"), "aliases", aliases)
    pq.write_table(b, tmp_path / "kb" / "b.parquet")
    before = _footer_readers_started()
    manifest = run(IndexConfig(model=onnx_model, kb=str(tmp_path / "kb"), out=str(tmp_path / "index"), shards=2,
                               **ONE_ENCODE_ACTOR)).manifest
    assert manifest["count"] == kb.num_rows - 2  # both files read, the 2 rows with bad text skipped
    assert manifest["skipped"] == {"bad_text": 2}, manifest["skipped"]
    assert _footer_readers_started() - before == 1
    assert FOOTER_READERS_ENV not in os.environ  # the job's setting does not outlive it
    bad_ids = set(b.column("entity_id").to_pylist()[:2])
    aliases_file = next((tmp_path / "index").glob("aliases*.parquet"))
    table = pq.read_table(aliases_file)
    alias_ids = set(table.column("entity_id").to_pylist())  # every value decodes
    assert not bad_ids & alias_ids and b.column("entity_id")[2].as_py() in alias_ids  # by its name
    assert len(table.column("alias").to_pylist()) == table.num_rows
    # the pass that rebuilds a lost shard (its node died) encodes that shard's KB rows, the
    # good ones ok and the bad ones skipped: here shard 1's rows, as the full build encoded them
    from otmel.backend import load_backend
    from otmel.jobs.index import encoded_entities, kb_files

    cfg = IndexConfig(model=onnx_model, kb=str(tmp_path / "kb"), out=str(tmp_path / "unused"), shards=2,
                      **ONE_ENCODE_ACTOR)
    rows = encoded_entities(cfg, kb_files(cfg.kb), load_backend(onnx_model).preprocessor, False,
                            (frozenset({1}), 2)).select_columns(["entity_id", "ok"]).take_all()
    ids = kb.column("entity_id").to_pylist()
    expected = {e for e, s in zip(ids, shard_of(ids, 2)) if s == 1}
    assert {r["entity_id"] for r in rows} == expected
    assert {r["entity_id"] for r in rows if not r["ok"]} == bad_ids & expected


def _by_id(directory) -> dict[str, dict]:
    """{shard name: {entity id: features}} of a local index."""
    _, shards = open_shards(directory, verify=True, use_gpu=False)
    out = {}
    for s in shards:
        rows = s.rows(0, s.count)
        out[s.name] = {e: {n: rows[n][i] for n in STORED_FEATURES} for i, e in enumerate(s.entity_ids)}
    return out


def test_update_equals_a_full_rebuild_and_leaves_untouched_shards_alone(ray_local, trained_run, synth_dir, tmp_path):
    """Apply adds, replacements and deletions to a 3-shard index built from a PyTorch checkpoint
    (one encode actor per build: each imports torch and loads the model)."""
    _, train = trained_run
    S = 3
    kb = pq.read_table(synth_dir / "kb.parquet")
    ids = kb.column("entity_id").to_pylist()
    shard = shard_of(ids, S)
    movable = [i for i, s in enumerate(shard) if s != 0]  # keep shard 0 untouched
    added, renamed, deleted = movable[:3], movable[3:5], movable[5:7]
    v1 = kb.filter(pa.array([i not in added for i in range(len(ids))]))
    renamed_rows = kb.take(pa.array(renamed)).set_column(1, "name", pa.array(["Renamed Entity"] * len(renamed)))
    changes = pa.concat_tables([kb.take(pa.array(added)), renamed_rows, kb.take(pa.array(deleted))])
    changes = changes.append_column("deleted", pa.array([False] * (len(added) + len(renamed)) + [True] * len(deleted)))
    final = pa.concat_tables([v1.filter(pc.invert(pc.is_in(v1.column("entity_id"), changes.column("entity_id")))),
                              renamed_rows, kb.take(pa.array(added))])
    for name, table in (("v1", v1), ("changes", changes), ("final", final)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
    common = dict(model=train.latest_checkpoint, shards=S, feature_dtype="fp32", workers=1)
    scratch = scratch_dirs()
    run(IndexConfig(kb=str(tmp_path / "v1.parquet"), out=str(tmp_path / "updated"), **common))
    before = json.loads((tmp_path / "updated" / "manifest.json").read_text())
    v1_feats = _by_id(tmp_path / "updated")
    result = run(IndexConfig(model=train.latest_checkpoint, kb=str(tmp_path / "changes.parquet"),
                             out=str(tmp_path / "updated"), update=True, workers=1))
    run(IndexConfig(kb=str(tmp_path / "final.parquet"), out=str(tmp_path / "rebuilt"), **common))
    assert not scratch_dirs() - scratch, "the builders left their scratch dirs"  # built, uploaded, removed

    after = json.loads((tmp_path / "updated" / "manifest.json").read_text())
    assert "shard-00000" not in result.shards_written
    assert after["shards"][0] == before["shards"][0]  # same dir, same checksums
    assert after["count"] == final.num_rows
    updated, rebuilt = _by_id(tmp_path / "updated"), _by_id(tmp_path / "rebuilt")
    assert {k: sorted(v) for k, v in updated.items()} == {k: sorted(v) for k, v in rebuilt.items()}
    for name in rebuilt:
        for eid, feats in rebuilt[name].items():
            for f in STORED_FEATURES:
                assert np.allclose(updated[name][eid][f], feats[f], atol=1e-5), (name, eid, f)
    # the renamed entities were re-encoded, not kept
    r_id, r_shard = ids[renamed[0]], f"shard-{shard[renamed[0]]:05d}"
    assert not np.allclose(updated[r_shard][r_id]["fused"], v1_feats[r_shard][r_id]["fused"], atol=1e-3)
    replaced_dirs = {e["dir"] for e in before["shards"]} - {e["dir"] for e in after["shards"]}
    assert replaced_dirs and not any((tmp_path / "updated" / d).exists() for d in replaced_dirs)
    assert after["aliases"] != before["aliases"] and not (tmp_path / "updated" / before["aliases"]).exists()
    aliases = pq.read_table(tmp_path / "updated" / after["aliases"])
    assert "renamed entity" in aliases.column("alias").to_pylist()
    assert not set(ids[i] for i in deleted) & set(aliases.column("entity_id").to_pylist())


#: the largest |S_O(fp16-stored entity features) - S_O(fp32 features)| the README states
FP16_RERANK_TOLERANCE = 5e-3


def test_fp16_stored_features_move_reranked_scores_by_less_than_the_stated_tolerance(s3_index, onnx_model, synth_dir,
                                                                                      s3_server):
    """The default --feature-dtype fp16 rounds the stored entity features: the reranked S_O
    of every (test mention, KB entity) pair stays within FP16_RERANK_TOLERANCE of the S_O of
    the model's own fp32 features (with fp32 storage the two are equal)."""
    from otmel.backend import load_backend
    from otmel.model.preprocessing import MODEL_INPUTS
    from otmel.linking.linker import LINK_MENTION_FEATURES
    from otmel.model.otmel import ENTITY_FEATURES
    from otmel.io.storage import local_copy

    backend = load_backend(onnx_model)
    kb = pq.read_table(synth_dir / "kb.parquet")
    test = pq.read_table(synth_dir / "mentions" / "test.parquet")
    eb = backend.preprocessor.entities(kb.select(["name", "attributes", "image"]).to_pydict())
    fresh = backend.encode({k: getattr(eb, k) for k in MODEL_INPUTS}, ENTITY_FEATURES)
    mb = backend.preprocessor.mentions(test.select(["mention", "text", "image"]).to_pydict())
    m = backend.encode({k: getattr(mb, k) for k in MODEL_INPUTS}, LINK_MENTION_FEATURES)
    row_of = {e: i for i, e in enumerate(kb.column("entity_id").to_pylist())}
    with local_copy(s3_index[0].out, s3_server) as d:
        manifest, shards = open_shards(d)
        assert manifest["feature_dtype"] == "fp16"
        stored = {n: np.zeros_like(v) for n, v in fresh.items()}
        for s in shards:
            rows = [row_of[e] for e in s.entity_ids]
            for n, v in s.gather(np.arange(s.count)[None], ENTITY_FEATURES).items():
                stored[n][rows] = v[0]
    M = len(test)
    grid = lambda f: {n: np.broadcast_to(v[None], (M, *v.shape)) for n, v in f.items()}  # noqa: E731
    diff = np.abs(backend.score(m, grid(stored))["overall"] - backend.score(m, grid(fresh))["overall"])
    assert 0 < diff.max() <= FP16_RERANK_TOLERANCE, diff.max()


def test_a_shard_builder_keeps_each_row_once_when_a_retried_routing_task_sends_it_again(tmp_path):
    """A routing task retried after its node died re-sends the batches it had already sent
    (the node-loss test may or may not hit that window): the builder keeps each entity once,
    counts the repeats, and its shard holds each row once."""
    from test_entity_index import SHAPES, _features

    from jobs.index import KeyPlan, ShardBuilder

    feats, ids = _features(6, seed=0), [f"Q{i}" for i in range(6)]
    builder = ShardBuilder("shard-00000", "shard-00000", str(tmp_path / "index"),
                           KeyPlan(factory="Flat", feature_dtype="fp32", missing_image="zeros", in_faiss=True))
    assert builder.append(ids[:4], {k: v[:4] for k, v in feats.items()}) == 4
    assert builder.append(ids[2:], {k: v[2:] for k, v in feats.items()}) == 2  # rows 2 and 3 sent again
    entry, kept, appended = builder.close("Flat", 6, SHAPES)
    assert appended == 6 and builder.repeated == 2 and entry["count"] == 6 and sorted(kept) == ids
