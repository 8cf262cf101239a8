"""otmel link end to end on Ray Data: S3 in and out, accounting, re-runs, shards, bad input, NIL."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from link_rows import assert_same_link_rows

from otmel.jobs.link import LinkConfig, run
from otmel.linking.link_output import output_name, read_link_output
from otmel.data.schemas import LINK_OUTPUT_SCHEMA

from conftest import ONE_ACTOR_EACH, cli_options, own_worker_env, png_bytes, scratch_dirs

BUCKET = "s3://otmel-test"


def _jsonl(rows: list) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode() + b"\n"


@pytest.fixture(scope="module")
def s3_inputs(synth_dir, s3_server):
    """Two mention Parquet files (the synth test split), a posts JSONL with bad lines and an
    unknown-columns file, all under s3://otmel-test/in/."""
    from otmel.io.storage import write_bytes

    test = pq.read_table(synth_dir / "mentions" / "test.parquet")
    half = test.num_rows // 2
    files = {}
    for name, part in (("a.parquet", test.slice(0, half)), ("b.parquet", test.slice(half))):
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink)
        files[name] = sink.getvalue().to_pybytes()
    kb = pq.read_table(synth_dir / "kb.parquet")
    name0 = kb.column("name")[0].as_py()
    text = f"Yesterday {name0} was seen in town with {name0} again."
    spans = [{"mention": name0, "start": 10, "end": 10 + len(name0)},
             {"mention": name0, "start": text.rindex(name0), "end": text.rindex(name0) + len(name0)}]
    posts = [
        {"post_id": "p1", "text": text, "mentions": spans},  # 2 mentions
        {"post_id": "p2", "text": "", "mentions": spans},  # empty text: 1 error row
        "{this is not json",  # 1 error row, id <file>:3
        {"post_id": "p4", "text": text, "mentions": spans[:1], "image": "bm90IGFuIGltYWdl"},  # corrupt image
        {"post_id": "p5", "text": text, "mentions": [{"mention": name0, "start": 5, "end": 999}]},  # bad span
        {"post_id": "p6", "text": text},  # no spans, no detection: error
        [1, 2, 3],  # a JSON array, not an object
        {"post_id": "p8", "text": text, "mentions": spans[:1], "image_uri": "/etc/hostname"},  # not allowed
        {"post_id": 9, "text": text, "mentions": "not a list"},  # an int id, spans of the wrong type
    ]
    files["posts.jsonl"] = _jsonl(posts)
    files["empty.jsonl"] = b""  # an empty part file still gets its (empty) output
    # mentions without text (none, null, blank): linked on the mention string, flagged no_context
    files["bare.jsonl"] = _jsonl([{"mention_id": "bare-1", "mention": name0},
                                  {"mention_id": "bare-2", "mention": name0, "text": None},
                                  {"mention_id": "bare-3", "mention": name0, "text": "  "},
                                  {"mention_id": "bare-4", "mention": name0, "text": text}])
    files["array.json"] = json.dumps([{"post_id": "j1", "text": text, "mentions": spans[:1]}]).encode()
    other = pa.BufferOutputStream()
    pq.write_table(pa.table({"foo": [1, 2], "bar": ["x", "y"]}), other)
    files["other.parquet"] = other.getvalue().to_pybytes()
    # files no reader claims, or that are not data: not read, each listed with its reason
    not_read = {"notes.docx": "unsupported", ".hidden.jsonl": "hidden", "_SUCCESS": "hidden",
                "old-out/part-0123456789abcdef0123.parquet": "an otmel link output"}
    for name, data in {**files, **{n: b"not read" for n in not_read}}.items():
        write_bytes(f"{BUCKET}/in/{name}", data, s3_server)
    expected = {"a.parquet": half, "b.parquet": test.num_rows - half, "posts.jsonl": 2 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1,
                "other.parquet": 2, "empty.jsonl": 0, "array.json": 1, "bare.jsonl": 4}
    return {"uri": f"{BUCKET}/in/", "test": test, "expected_rows": expected, "text": text, "spans": spans,
            "not_read": not_read}


@pytest.fixture(scope="module")
def s3_link(s3_index, s3_inputs, onnx_model, s3_server):
    idx_cfg, idx = s3_index
    cfg = LinkConfig(model=onnx_model, index=idx_cfg.out, input=s3_inputs["uri"], output=f"{BUCKET}/out-1",
                     top_k=3, candidates=10, s3_endpoint=s3_server, skip_unsupported=True)
    before = scratch_dirs()
    result = run(cfg)
    return cfg, result, idx, scratch_dirs() - before


def test_every_input_mention_gives_exactly_one_row_in_the_contract_schema(s3_link, s3_inputs, s3_server):
    import ray

    cfg, result, idx, _ = s3_link
    out = read_link_output(cfg.output, s3_server)
    assert out.schema.remove_metadata() == LINK_OUTPUT_SCHEMA
    assert out.num_rows == sum(s3_inputs["expected_rows"].values())
    counts = result.summary["counts"]
    assert counts["in"] == out.num_rows == sum(counts[s] for s in ("ok", "nil", "no_mention", "error"))
    # the encoder that ran is reported, and the index says what encoded its entities
    assert result.summary["model"] == {"kind": "onnx", "precision": "fp32"} == idx.manifest["encoder"]
    # the default encode pool (--workers auto): one single-thread actor per CPU
    assert result.summary["pools"]["encode"] == str(int(ray.cluster_resources()["CPU"]))
    # one output file per input file, named by the hash of its path
    for name, rows in s3_inputs["expected_rows"].items():
        part = pq.read_table(pa.BufferReader(_read(f"{cfg.output}/{output_name(cfg.input + name)}", s3_server)))
        assert part.num_rows == rows, name
    # every test mention exactly once, linked to a KB entity with top-k sorted candidates
    ids = out.column("mention_id").to_pylist()
    test_ids = s3_inputs["test"].column("mention_id").to_pylist()
    assert sorted(i for i in ids if i in set(test_ids)) == sorted(test_ids)
    rows = [r for r in out.to_pylist() if r["mention_id"] in set(test_ids)]
    assert all(r["status"] == "ok" and r["error"] is None for r in rows)
    assert all(len(r["candidates"]) == 3 and r["entity_id"] == r["candidates"][0]["entity_id"] for r in rows)
    assert all(r["candidates"][0]["score"] >= r["candidates"][1]["score"] >= r["candidates"][2]["score"] for r in rows)
    assert set(out.column("model_version").to_pylist()) == {idx.manifest["model_version"]}
    assert set(out.column("index_version").to_pylist()) == {idx.index_version}
    success = json.loads(_read(f"{cfg.output}/_SUCCESS.json", s3_server))
    assert success["counts"] == counts and success["index_version"] == idx.index_version
    # every file of the input not read is accounted for, with its reason (--skip-unsupported)
    assert success["skipped_files"] == result.summary["skipped_files"]
    skipped = {f.rsplit("/in/", 1)[1]: reason for f, reason in success["skipped_files"].items()}
    assert set(skipped) == set(s3_inputs["not_read"]), skipped
    assert all(skipped[name].startswith(why) for name, why in s3_inputs["not_read"].items()), skipped


def test_a_job_on_a_remote_index_leaves_no_local_shard_copy_behind(s3_link):
    """The shard servers copied their S3 shards to local disk; the job's end removes the copies
    (each actor removes its own before ``ray.kill``, which skips atexit: the copies stayed on
    every node after every job)."""
    assert s3_link[3] == set()


def test_a_restarted_actors_scratch_dir_replaces_its_predecessors_copy(tmp_path, monkeypatch):
    """A killed actor (SIGKILL: no atexit) leaves its copy; its restart keeps the actor id,
    so the same scratch dir is emptied and reused, not a second one added."""
    import tempfile

    from otmel.io.storage import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = scratch_dir("otmel-shard-00000-", "a1b2")
    (first / "features.bin").write_bytes(b"x" * 10)
    again = scratch_dir("otmel-shard-00000-", "a1b2")
    assert again == first and not any(again.iterdir())
    other = scratch_dir("otmel-shard-00000-", "c3d4")  # another replica's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["otmel-shard-00000-a1b2", "otmel-shard-00000-c3d4"] \
        and other != first


def test_bad_rows_become_error_rows_with_their_reason(s3_link, s3_inputs, s3_server):
    cfg, result, _, _ = s3_link
    out = {r["mention_id"]: r for r in read_link_output(cfg.output, s3_server).to_pylist()}
    posts = cfg.input + "posts.jsonl"
    sp = s3_inputs["spans"]
    assert out[f"p1:{sp[0]['start']}-{sp[0]['end']}"]["status"] == "ok"
    assert out[f"p1:{sp[1]['start']}-{sp[1]['end']}"]["start"] == sp[1]["start"]
    assert out["p2"]["status"] == "error" and out["p2"]["error"].startswith("empty_text")
    assert out[f"{posts}:3"]["status"] == "error" and out[f"{posts}:3"]["error"].startswith("bad_json")
    assert out[f"{posts}:7"]["error"].startswith("bad_json")
    # a mentions row without text is linked on its mention string alone, and says so
    for i in (1, 2, 3):
        row = out[f"bare-{i}"]
        assert row["status"] in ("ok", "nil") and row["candidates"] and row["error"] is None, row
        assert row["warning"] == "no_context", row
    assert out["bare-4"]["warning"] is None and out["bare-4"]["status"] in ("ok", "nil")
    assert {r["warning"] for r in out.values()} == {None, "no_context"}
    assert result.summary["warnings"] == {"no_context": 3}
    assert out[f"p4:{sp[0]['start']}-{sp[0]['end']}"]["error"].startswith("bad_image")
    assert out["p5:5-999"]["error"].startswith("bad_span")
    assert out["p6"]["error"].startswith("no_spans")
    p8 = out[f"p8:{sp[0]['start']}-{sp[0]['end']}"]
    assert p8["status"] == "error" and "bad_image" in p8["error"] and "/etc/hostname" in p8["error"]
    other = cfg.input + "other.parquet"
    assert out[f"{other}:0"]["error"].startswith("unknown_columns") and out[f"{other}:1"]["status"] == "error"
    assert out["9"]["error"].startswith("bad_span") and out["9"]["post_id"] == "9"
    assert out[f"j1:{sp[0]['start']}-{sp[0]['end']}"]["status"] == "ok"  # a JSON array file
    assert all(r["entity_id"] is None and r["candidates"] is None for r in out.values() if r["status"] == "error")
    assert result.summary["errors_by_reason"]["bad_json"] == 2


def _job_actors() -> dict[int, str]:
    """The shard and commit-coordinator actors' worker processes of this session's Ray, by
    their process titles (a killed actor's process exits)."""
    from otmel.io.worker_memory import ray_workers

    return {p.pid: k for p, k in ray_workers(("ShardServer", "CommitCoordinator"), root_pid=os.getpid())}


def test_rerun_skips_complete_outputs_and_forced_rerun_reproduces_them(s3_link, s3_server):
    """Re-runs of a library caller in one Ray instance: a complete output is skipped, a
    rewritten input relinked alone, a forced run reproduces every file; and each job's shard
    actors and commit coordinator end with it (left to the garbage collector, two earlier
    jobs' shard actors were still alive holding 0.25 CPU each, and the third job on 2 cores
    ran at ~0.6 of the first's pace)."""
    cfg, first, _, _ = s3_link
    before = set(_job_actors())  # an earlier job's, on their way out or not
    again = run(cfg)
    inputs = len(first.summary["files"])
    assert inputs == 7 and again.summary["files_processed"] == 0 and again.summary["files_skipped_complete"] == inputs
    assert again.summary["counts"] == first.summary["counts"]
    # a rewritten input is linked again, and only that one
    time.sleep(1.1)  # a new mtime
    _write(cfg.input + "a.parquet", _read(cfg.input + "a.parquet", s3_server), s3_server)
    changed = run(cfg)
    assert changed.summary["files_processed"] == 1 and changed.summary["counts"] == first.summary["counts"]
    forced = run(LinkConfig(**{**cfg.to_dict(), "output": f"{BUCKET}/out-2", "force": True}))
    assert forced.summary["files_processed"] == inputs
    a, b = read_link_output(cfg.output, s3_server), read_link_output(forced.output, s3_server)
    assert_same_link_rows(a.to_pylist(), b.to_pylist())  # same files (hash names), rows in the same order
    deadline = time.time() + 30  # a killed actor is reported dead within moments
    while set(_job_actors()) - before and time.time() < deadline:
        time.sleep(0.5)
    left = {pid: k for pid, k in _job_actors().items() if pid not in before}
    assert not left, left


#: a value other than the s3_link fixture's for every LinkConfig field; True = the field
#: changes output rows (a re-run recomputes every file), False = it only changes how or
#: where the work runs (a re-run skips every file). A new field must be added here.
RERUN_KEY_CASES = {
    "top_k": (2, True), "candidates": (12, True), "nil_threshold": (0.5, True), "detect_mentions": ("alias", True),
    "context_chars": (50, True), "min_alias_length": (2, True), "max_alias_entities": (5, True),
    "bad_image": ("text", True), "allow_image_prefix": (["/data/images"], True), "allow_private_hosts": (True, True),
    "image_timeout_s": (2.0, True), "max_image_bytes": (1 << 20, True), "image_transform": ("device", True),
    "workers": ("1-2", False), "link_actors": (1, False), "shard_replicas": (2, False), "shard_gpus": (0.5, False),
    "batch_size": (8, False), "read_chunk_rows": (16, False), "read_chunk_bytes": (1 << 20, False),
    "cpus_per_actor": (1.0, False), "gpu": (False, False), "address": ("auto", False), "stall_timeout_s": (30.0, False),
    "output": (f"{BUCKET}/out-1/", False),  # the same place spelled with a slash
    "skip_unsupported": (False, False),  # which files are read is the input listing's, not a row setting
    "dry_run": (True, False),
    "require_text": (True, True), "max_text_bytes": (1000, True), "truncate_text": (True, True),
}


def test_a_dry_run_prints_the_plan_and_starts_and_writes_nothing(s3_link, s3_inputs, s3_server, capsys):
    """`otmel link --dry-run` after the job: every input file with its size (rows for Parquet)
    and what a run would do (here: skip, its output is complete; with --force: link), every file
    not read with its reason; the output untouched (no probe, no delete, no _SUCCESS.json)."""
    import boto3

    from otmel.cli.main import main

    cfg, _, _, _ = s3_link
    s3 = boto3.client("s3", endpoint_url=s3_server)

    def listing():
        return {o["Key"]: (o["ETag"], o["LastModified"]) for o in
                s3.list_objects_v2(Bucket=BUCKET.removeprefix("s3://"), Prefix="out-1/").get("Contents", [])}

    before = listing()
    argv = ["link", "--model", cfg.model, "--index", cfg.index, "--input", cfg.input, "--output", cfg.output,
            "--top-k", str(cfg.top_k), "--candidates", str(cfg.candidates), "--s3-endpoint", s3_server,
            "--skip-unsupported", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    files = len(s3_inputs["expected_rows"])
    assert out[0].startswith(f"dry run: 0 input file(s) to link, {files} complete (skipped), "
                             f"{len(s3_inputs['not_read'])} not read"), out
    assert sum(line.startswith("  skip ") for line in out) == files
    assert any("a.parquet" in line and f"{s3_inputs['expected_rows']['a.parquet']:,} rows" in line for line in out)
    assert sum(line.startswith("  not read ") for line in out) == len(s3_inputs["not_read"])
    assert main([*argv, "--force"]) == 0
    assert capsys.readouterr().out.startswith(f"dry run: {files} input file(s) to link, 0 complete")
    assert listing() == before


def test_rerun_keys_recompute_exactly_the_files_whose_result_would_change(s3_link, s3_server):
    """Re-run keys of the committed outputs: every setting that changes output rows, the
    model, the index, and an input file's size make a re-run recompute (that file, for the
    input); nothing else does. Checked on the s3_link outputs as the job plans its work."""
    from otmel.jobs.link import preflight
    from otmel.jobs.link_resume import plan_inputs
    from otmel.linking.link_input import list_input_files

    cfg, first, _, _ = s3_link
    pre = preflight(cfg)
    files = list_input_files(cfg.input, s3_server)
    model_v, index_v = pre["backend"].model_version, pre["index_version"]

    def planned(c=cfg, model=model_v, index=index_v, coherence=None):
        todo, done, _ = plan_inputs(c, files, model, index, c.nil_threshold if c.nil_threshold is not None
                                    else pre["nil_threshold"], coherence)
        assert sorted(todo + list(done)) == sorted(files)
        return sorted(todo)

    assert planned() == []  # as committed
    # the KGE embeddings count by content and their weight as resolved (given or calibrated): below
    fields = {f.name for f in dataclasses.fields(LinkConfig)} - {"model", "index", "input", "force", "s3_endpoint",
                                                                 "kge_embeddings", "coherence_weight"}
    assert set(RERUN_KEY_CASES) == fields, "classify every LinkConfig field in RERUN_KEY_CASES"
    for name, (value, changes_rows) in RERUN_KEY_CASES.items():
        assert getattr(cfg, name) != value, name
        other = LinkConfig(**{**cfg.to_dict(), name: value})
        assert planned(other) == (sorted(files) if changes_rows else []), name
    assert planned(LinkConfig(**{**cfg.to_dict(), "force": True})) == sorted(files)
    assert planned(model=model_v[:-1] + "x") == sorted(files)  # another model
    assert planned(index=index_v[:-1] + "x") == sorted(files)  # another index
    coherent = {"embeddings": "s3://b/emb.parquet", "version": "0123456789abcdef", "weight": 1.0}
    assert planned(coherence=coherent) == sorted(files)  # coherence on
    for changed in ({"version": "fedcba9876543210"}, {"weight": 2.0}):  # other vectors, another weight
        first_plan = plan_inputs(cfg, files, model_v, index_v, pre["nil_threshold"], coherent)[2]
        other_plan = plan_inputs(cfg, files, model_v, index_v, pre["nil_threshold"], {**coherent, **changed})[2]
        assert all(first_plan[f]["settings"] != other_plan[f]["settings"] for f in files), changed
    moved = plan_inputs(cfg, files, model_v, index_v, pre["nil_threshold"], {**coherent, "embeddings": "/elsewhere"})[2]
    assert all(moved[f]["settings"] == first_plan[f]["settings"] for f in files)  # the same vectors elsewhere
    a = cfg.input + "a.parquet"
    original = _read(a, s3_server)
    sink = pa.BufferOutputStream()
    pq.write_table(pq.read_table(pa.BufferReader(original)).slice(1), sink)  # one row fewer: another size
    _write(a, sink.getvalue().to_pybytes(), s3_server)
    try:
        assert planned() == [a]
    finally:
        _write(a, original, s3_server)


def _encoded_mentions(backend, mentions: pa.Table) -> dict[str, np.ndarray]:
    """The link job's mention features, computed in this process."""
    from otmel.linking.linker import LINK_MENTION_FEATURES
    from otmel.model.preprocessing import MODEL_INPUTS

    batch = backend.preprocessor.mentions(mentions.select(["mention", "text", "image"]).to_pydict())
    return backend.encode({n: getattr(batch, n) for n in MODEL_INPUTS}, LINK_MENTION_FEATURES)


def _exhaustive_scores(backend, shards, m: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Brute force, in this process: every stored entity's id, and S_O of every mention
    against every one of them (mentions x entities)."""
    from otmel.model.otmel import ENTITY_FEATURES

    ids = np.concatenate([s.entity_ids for s in shards])
    grid = {n: np.concatenate([s.gather(np.arange(s.count)[None], (n,))[n][0] for s in shards]) for n in ENTITY_FEATURES}
    M = len(next(iter(m.values())))
    return ids, backend.score(m, {n: np.broadcast_to(v[None], (M, *v.shape)) for n, v in grid.items()})["overall"]


def _top(ids: np.ndarray, scores: np.ndarray, k: int) -> list[int]:
    """The ``k`` best entities of one mention by (-score, entity id), as the link job orders them."""
    return sorted(range(len(ids)), key=lambda j: (-scores[j], ids[j]))[:k]


def test_sharded_replicated_index_gives_the_exhaustive_results(s3_index, onnx_model, synth_dir, tmp_path, s3_server):
    """Flat index, K >= shard size: the job on 2 shards x 2 replicas returns, for every
    mention, the top-5 of an exhaustive S_O over all 60 entities (brute force in this
    process), candidates and scores; every replica serves batches, each batch going to one
    replica of every shard."""
    from otmel.backend import load_backend
    from otmel.linking.entity_index import open_shards
    from otmel.io.storage import local_copy

    mentions = pq.read_table(synth_dir / "mentions" / "test.parquet")
    K = 64  # >= every shard's size (60 entities in all)
    r = run(LinkConfig(model=onnx_model, index=s3_index[0].out, input=str(synth_dir / "mentions" / "test.parquet"),
                       output=str(tmp_path / "out"), top_k=5, candidates=K, batch_size=16, shard_replicas=2,
                       s3_endpoint=s3_server, **ONE_ACTOR_EACH))  # one link actor takes the replicas in turn
    assert r.summary["pools"]["shard_replicas"] == 2
    rows = read_link_output(r.output).to_pylist()
    backend = load_backend(onnx_model)
    with local_copy(s3_index[0].out, s3_server) as d:
        ids, scores = _exhaustive_scores(backend, open_shards(d)[1], _encoded_mentions(backend, mentions))
    exhaustive = {mention_id: [(str(ids[j]), float(scores[i, j])) for j in _top(ids, scores[i], 5)]
                  for i, mention_id in enumerate(mentions.column("mention_id").to_pylist())}
    assert sorted(row["mention_id"] for row in rows) == sorted(exhaustive)
    for row in rows:
        expected = exhaustive[row["mention_id"]]
        assert [c["entity_id"] for c in row["candidates"]] == [e for e, _ in expected], row["mention_id"]
        assert np.allclose([c["score"] for c in row["candidates"]], [s for _, s in expected], atol=1e-5)
        assert row["entity_id"] in (None, expected[0][0])  # the top candidate, or NIL
    # per shard: 2 replicas, both serving; every batch reached every shard once
    served, batches = r.summary["shard_batches"], -(-len(rows) // 16)
    assert len(served) == 2 and all(len(v) == 2 and min(v) > 0 for v in served.values()), served
    assert len({sum(v) for v in served.values()}) == 1 and sum(next(iter(served.values()))) >= batches


def test_rerank_scores_equal_exhaustive_scores_and_topk_follows(onnx_model, s3_index, synth_dir, s3_server):
    """DESIGN.md guarantees, on the stored features: reranked scores == exhaustive S_O for the
    same pairs; top-k == exhaustive top-k when it lies in the candidates; identical when K = E."""
    from otmel.backend import load_backend
    from otmel.linking.entity_index import open_shards
    from otmel.linking.linker import ShardLinker, link_locally
    from otmel.io.storage import local_copy

    backend = load_backend(onnx_model)
    test = pq.read_table(synth_dir / "mentions" / "test.parquet")
    m = _encoded_mentions(backend, test)
    with local_copy(s3_index[0].out, s3_server) as d:
        _, shards = open_shards(d)
        linkers = [ShardLinker(s, backend) for s in shards]
        E = sum(s.count for s in shards)
        all_ids, exhaustive = _exhaustive_scores(backend, shards, m)  # S_O over every stored entity
        M = len(test)
        lookup = {e: j for j, e in enumerate(all_ids)}
        k = 3
        ex_top = [_top(all_ids, exhaustive[i], k) for i in range(M)]
        full = link_locally(linkers, m, E, k)
        small = link_locally(linkers, m, 4, k)
    for i in range(M):
        for e, s in zip(small.entity_ids[i], small.scores[i]):
            assert s == pytest.approx(exhaustive[i, lookup[e]], abs=1e-5)
        assert [lookup[e] for e in full.entity_ids[i]] == ex_top[i]
    contained = 0
    for i in range(M):  # FAISS indexes and ids are in memory: usable after the copy is gone

        cands = set(shards_top(linkers, m, i))
        if {all_ids[j] for j in ex_top[i]} <= cands:
            contained += 1
            assert [lookup[e] for e in small.entity_ids[i]] == ex_top[i]
    assert contained > M // 2


def shards_top(linkers, m, i):
    """Every candidate any shard retrieved for mention i (K = 4)."""
    out = []
    for lk in linkers:
        _, rows = lk.shard.search(m["retrieval_query"][i:i + 1], 4)
        out.extend(lk.shard.entity_ids[r] for r in rows[0] if r >= 0)
    return out


def test_shard_actors_and_the_link_stage_score_and_merge_without_torch_or_transformers(
        ray_local, onnx_model, s3_index, synth_dir, s3_server):
    """An index shard actor of an ONNX export (from S3) loads, links a batch, and the link
    stage's merge and part writer load beside it, and none of them imports torch or
    transformers: they only score with the ONNX matcher. At ViT-B/32 size those imports were
    ~5 s of CPU of each shard actor's start and ~4 s of each link actor's first batch, taken
    from the encoder on a small node (issue 14: end-to-end / encode-only)."""
    import ray

    from otmel.backend import load_backend
    from otmel.linking.entity_index import load_manifest
    from otmel.jobs.link_pipeline import ShardServer

    idx_cfg, _ = s3_index
    backend = load_backend(onnx_model)
    feats = _encoded_mentions(backend, pq.read_table(synth_dir / "mentions" / "test.parquet").slice(0, 8))
    manifest = load_manifest(idx_cfg.out, s3_server)

    def link_stage_imports(self):
        import sys

        from otmel.jobs.link_pipeline import LinkStage  # noqa: F401 - what a link actor imports for a batch
        from otmel.linking.link_output import write_part  # noqa: F401
        from otmel.linking.linker import merge_topk, nil_decision  # noqa: F401
        from otmel.data.schemas import CANDIDATE  # noqa: F401

        return sorted(m for m in ("torch", "transformers") if m in sys.modules)

    actor = ray.remote(ShardServer).options(num_cpus=0.25, runtime_env=own_worker_env()).remote(
        idx_cfg.out, manifest["shards"][0], manifest, onnx_model, s3_server)
    found = ray.get(actor.link.remote(feats, 5, 3))
    assert found.entity_ids.shape == (8, 3) and np.isfinite(found.scores).all()
    assert ray.get(actor.__ray_call__.remote(link_stage_imports)) == []
    from otmel.jobs.common import end_actors

    end_actors([actor])  # as the job does: its copy of the S3 shard goes with it


def test_job_level_mismatches_fail_before_any_work(s3_index, onnx_model, tmp_path, s3_server):
    from otmel.linking.entity_index import IndexMismatchError
    from otmel.model.factory import save_model

    from conftest import make_model

    other, pre = make_model("kd", seed=3)
    save_model(other, pre, tmp_path / "other")
    good = dict(index=s3_index[0].out, output=str(tmp_path / "out"), s3_endpoint=s3_server)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"mention_id": ["m"], "mention": ["x"]}), tmp_path / "in" / "m.parquet")
    with pytest.raises(IndexMismatchError, match="rebuild the index"):
        run(LinkConfig(model=str(tmp_path / "other"), input=str(tmp_path / "in"), **good))
    with pytest.raises(FileNotFoundError, match="no input files"):
        run(LinkConfig(model=onnx_model, input=f"{BUCKET}/no-such-prefix/*.parquet", **good))
    with pytest.raises(ValueError, match="--top-k"):
        LinkConfig(model=onnx_model, input="x", top_k=30, candidates=20, **good)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--stall-timeout"):
            LinkConfig(model=onnx_model, input="x", stall_timeout_s=bad, **good)
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_fails_before_any_work(s3_index, onnx_model, synth_dir, tmp_path, capsys, s3_server):
    """An output that cannot be written failed only after every row was encoded (37 s); now the
    job's preflight (before Ray work) writes and removes a probe there and stops in one line."""
    from otmel.cli.main import main
    from otmel.io.storage import StorageError
    from otmel.jobs.link import preflight

    (tmp_path / "afile").write_text("a file where the output's parent directory should be")
    cfg = LinkConfig(model=onnx_model, index=s3_index[0].out, input=str(synth_dir / "mentions" / "dev.parquet"),
                     output=str(tmp_path / "afile" / "out"), s3_endpoint=s3_server)
    with pytest.raises(StorageError, match="--output .*afile/out is not writable"):
        preflight(cfg)
    code = main(["link", "--model", cfg.model, "--index", cfg.index, "--input", cfg.input, "--output", cfg.output,
                 "--s3-endpoint", s3_server])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not writable" in err[0], err
    # a writable output keeps nothing of the probe
    preflight(LinkConfig(**{**cfg.to_dict(), "output": str(tmp_path / "ok")}))
    assert list((tmp_path / "ok").iterdir()) == []


def test_cli_link_reports_a_missing_input_in_one_line(s3_index, onnx_model, tmp_path, capsys, s3_server):
    from otmel.cli.main import main

    code = main(["link", "--model", onnx_model, "--index", s3_index[0].out, "--input", str(tmp_path / "none"),
                 "--output", str(tmp_path / "o"), "--s3-endpoint", s3_server])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no input files" in err[0]


def _write(uri, data, endpoint):
    from otmel.io.storage import write_bytes

    write_bytes(uri, data, endpoint)


def _read(uri, endpoint):
    from otmel.io.storage import read_bytes

    return read_bytes(uri, endpoint)


def _send_png(handler, body: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def image_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving one PNG at /img.png."""
    import http.server
    import threading

    body = png_bytes(5)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path != "/img.png":
                self.send_error(404)
                return
            _send_png(self, body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_detected_mentions_in_posts_with_http_and_local_images(s3_index, onnx_model, synth_dir, tmp_path,
                                                               image_server, s3_server):
    """Posts without spans: alias detection finds the KB names (offsets into the original text),
    a post with none gives one no_mention row; http(s) images from an allowed private host and
    local images under an allowed prefix are used, a local path outside it is an error row."""
    kb = pq.read_table(synth_dir / "kb.parquet")
    name = kb.column("name")[0].as_py()
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(png_bytes(7))
    (tmp_path / "outside.png").write_bytes(png_bytes(8))
    text = f"Breaking:  {name.upper()} spoke today. Later {name} left."
    posts = [
        {"post_id": "d1", "text": text, "image_uri": f"{image_server}/img.png"},
        {"post_id": "d2", "text": "nothing to see in this text", "image_uri": f"{image_server}/img.png"},
        {"post_id": "d3", "text": text, "image_uri": str(allowed / "a.png")},
        {"post_id": "d4", "text": text, "image_uri": str(tmp_path / "outside.png")},
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "posts.jsonl").write_bytes(_jsonl(posts))
    r = run(LinkConfig(model=onnx_model, index=s3_index[0].out, input=str(tmp_path / "in" / "*.jsonl"),
                       output=str(tmp_path / "out"), detect_mentions="alias", allow_private_hosts=True,
                       allow_image_prefix=[str(allowed)], s3_endpoint=s3_server, **ONE_ACTOR_EACH))
    rows = read_link_output(r.output).to_pylist()
    by_post: dict[str, list] = {}
    for row in rows:
        by_post.setdefault(row["post_id"], []).append(row)
    d1 = sorted(by_post["d1"], key=lambda x: x["start"])
    assert [text[x["start"]:x["end"]] for x in d1] == [name.upper(), name]
    assert all(x["status"] == "ok" and x["mention"] == text[x["start"]:x["end"]] for x in d1)
    assert [x["status"] for x in by_post["d2"]] == ["no_mention"] and by_post["d2"][0]["mention_id"] == "d2"
    assert all(x["status"] == "ok" for x in by_post["d3"])
    assert all(x["status"] == "error" and "outside.png" in x["error"] for x in by_post["d4"])
    assert r.summary["counts"] == {"in": 7, "ok": 4, "nil": 0, "no_mention": 1, "error": 2}


def _wait_for(predicate, what: str, timeout: float = 300.0, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert alive(), f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _staged_parts(out: Path, input_file: str | None = None) -> list:
    """Parts staged by link actors (of one input file if given); a commit's temporary file
    (``commit-*``) is not a part."""
    from otmel.linking.link_output import input_hash

    root = out / "_staging" / input_hash(input_file) if input_file else out / "_staging"
    return [p for p in root.rglob("*.parquet") if not p.name.startswith("commit-")] if root.exists() else []


def test_a_batch_mixing_chunks_out_of_order_is_written_as_slices_of_the_sorted_file(tmp_path):
    """Ray Data forms a batch from blocks in arrival order: the end of one read chunk and the
    start of an earlier one, or two chunks with a gap between them. Each part written must be
    a slice of the file's sorted output, or the commit finds parts overlapping (seen on the
    1 GB bench: chunks of 127 rows, batches of 64)."""
    from otmel.jobs.link_pipeline import consecutive_runs, read_inputs

    n = 50
    pq.write_table(pa.table({"mention_id": [f"m{i:02d}" for i in range(n)], "mention": ["a"] * n}),
                   tmp_path / "x.parquet")
    chunks = list(read_inputs({"path": np.array([str(tmp_path / "x.parquet")], dtype=object)}, None, None, 200,
                              chunk_rows=7))
    seq = pa.concat_tables(chunks).column("file_seq").to_pylist()
    assert seq == list(range(n)) and [c.column("file_rows")[0].as_py() for c in chunks] == [-1] * 7 + [n]
    # a batch: the tail of chunk 3, the head of chunk 1, then a piece of chunk 5 (a gap before it)
    batch = pa.concat_tables([chunks[3].slice(4), chunks[1].slice(0, 5), chunks[5].slice(2, 3)])
    runs = consecutive_runs(batch)
    assert [r.column("file_seq").to_pylist() for r in runs] == [[7, 8, 9, 10, 11], [25, 26, 27], [37, 38, 39]]
    assert [r.column("mention_id").to_pylist()[0] for r in runs] == ["m07", "m25", "m37"]


def test_the_commit_tracker_counts_a_retried_part_once_and_refuses_overlapping_rows(ray_local, tmp_path):
    """A link task retried after its actor died reports the same batch again (a new part file
    with the same rows): counted once, the file committed with each row once. Parts that
    overlap without being the same batch mean duplicated rows: refused."""
    from otmel.jobs.link_commit import CommitTracker
    from otmel.linking.link_output import PART_SCHEMA, write_part

    def rows(lo, hi):
        return pa.Table.from_pylist([{"mention_id": f"m{i}", "status": "nil", "source_row": i} for i in range(lo, hi)],
                                    schema=PART_SCHEMA)

    out, f = str(tmp_path / "out"), "in/a.parquet"
    cfg = LinkConfig(model="m", index="i", input="in", output=out)
    tracker = CommitTracker(cfg, {f: {"input": f}})
    first = write_part(rows(0, 4), out, f)
    tracker.add(f, -1, first)
    tracker.add(f, -1, write_part(rows(0, 4), out, f))  # the retried batch
    tracker.add(f, 6, write_part(rows(4, 6), out, f))
    written = tracker.finish([f])
    assert written[f]["rows"] == 6 and tracker.retried_parts == 1
    assert read_link_output(out).column("mention_id").to_pylist() == [f"m{i}" for i in range(6)]
    tracker = CommitTracker(cfg, {f: {"input": f}})
    tracker.add(f, -1, write_part(rows(0, 4), out, f))
    with pytest.raises(RuntimeError, match="rows duplicated"):
        tracker.add(f, 5, write_part(rows(2, 5), out, f))


class GatedImages:
    """A local HTTP server that holds every image request until :meth:`open`: a stalled image
    host, applied from outside (the rows that need its images cannot get past preprocessing)."""

    def __init__(self):
        import http.server
        import threading

        body = png_bytes(5)
        self.lock = threading.Condition()
        self.waiting = 0  # requests held now
        self.opened = False
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                with gate.lock:
                    gate.waiting += 1
                    while not gate.opened:
                        gate.lock.wait()
                    gate.waiting -= 1
                _send_png(self, body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def open(self) -> None:
        with self.lock:
            self.opened = True
            self.lock.notify_all()

    def close(self) -> None:
        self.open()
        self.server.shutdown()


def test_a_killed_driver_leaves_only_whole_files_and_the_rerun_completes_them_once(ray_local, s3_index, onnx_model,
                                                                                   synth_dir, tmp_path, s3_server):
    """A small input file is committed as soon as its rows are linked, while the big one is
    still being linked: the big file's first row group is linked and staged, its other rows
    carry images from a host that holds them (a stalled image host, applied from outside), so
    it cannot finish and the job cannot end, however fast or slow the machine is. The driver
    is then SIGKILLed: readers (pyarrow.dataset, DuckDB) see the committed file whole and
    nothing of the other, whose parts stay staged; a re-run skips the first and links the
    second exactly once."""
    import signal
    import subprocess
    import sys

    import duckdb
    import pyarrow.dataset as pads
    import ray

    from PIL import Image

    test = pq.read_table(synth_dir / "mentions" / "test.parquet")
    (tmp_path / "in").mkdir()
    # 16 rows: a read block of its own, at least a batch (a smaller block waits for other
    # rows to make up a batch with)
    small_rows = test.slice(0, 16)
    pq.write_table(small_rows, tmp_path / "in" / "a-small.parquet")
    images = GatedImages()
    # the big file: a first row group of 8 rows with ~1.5 MB inline images (past Ray Data's
    # 8 MiB block size: a block of its own, a batch, linked and staged) then rows whose images
    # the host holds
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(buf, "PNG")
    held = test.set_column(test.column_names.index("image"), "image", pa.nulls(test.num_rows, pa.binary()))
    held = held.set_column(held.column_names.index("image_uri"), "image_uri",
                           pa.array([f"{images.url}/img.png?row={r}" for r in range(held.num_rows)]))
    fat = test.slice(0, 8).set_column(test.column_names.index("image"), "image", pa.array([buf.getvalue()] * 8))
    big = pa.concat_tables([fat, held])
    big = big.set_column(0, "mention_id", pa.array([f"big-{i}" for i in range(big.num_rows)]))
    pq.write_table(big, tmp_path / "in" / "b-big.parquet", row_group_size=8)
    out = tmp_path / "out"
    cfg = LinkConfig(model=onnx_model, index=s3_index[0].out, input=str(tmp_path / "in"), output=str(out),
                     read_chunk_rows=16, read_chunk_bytes=64 << 20, batch_size=8, s3_endpoint=s3_server,
                     allow_private_hosts=True, image_timeout_s=600, address=ray.get_runtime_context().gcs_address)
    code = f"from otmel.jobs.link import LinkConfig, run; run(LinkConfig(**{cfg.to_dict()!r}))"
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    small, large = (str(tmp_path / "in" / f) for f in ("a-small.parquet", "b-big.parquet"))
    try:
        _wait_for(lambda: (out / output_name(small)).exists() and _staged_parts(out, large),
                  "the small file's commit and a staged part of the big one", timeout=600,
                  alive=lambda: driver.poll() is None)
        assert images.waiting and not (out / output_name(large)).exists() and driver.poll() is None
        driver.send_signal(signal.SIGKILL)
        driver.wait(60)
        seen = pads.dataset(str(out), format="parquet").to_table()
        assert sorted(seen.column("mention_id").to_pylist()) == sorted(small_rows.column("mention_id").to_pylist())
        assert duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall() == [(16,)]
        assert not (out / "_SUCCESS.json").exists() and _staged_parts(out, large)
        images.open()
        again = run(LinkConfig(**{**cfg.to_dict(), "address": None}))
    finally:
        if driver.poll() is None:
            driver.kill()
        images.close()
    assert again.summary["files_skipped_complete"] == 1 and again.summary["files_processed"] == 1
    rows = read_link_output(str(out))
    assert rows.num_rows == 16 + big.num_rows == len(set(rows.column("mention_id").to_pylist()))
    assert not _staged_parts(out) and again.summary["counts"]["ok"] == rows.num_rows


def test_two_jobs_into_one_output_one_refused_then_sigterm_and_sigint_stop_it_in_one_line_and_the_rerun_completes(
        ray_local, s3_index, onnx_model, synth_dir, tmp_path, s3_server):
    """`otmel link` (the CLI, joined to the session's Ray) with a small file and a big one
    whose images a host holds (the job cannot end by itself), started twice at once with the
    same --output: one takes the output's lease, the other exits 2 in one line naming it.
    SIGTERM to the first once the small file is committed: exit 143 and one last line saying 1
    of 2 files were kept, no traceback and no C++ stack dump (it was exit 134, SIGABRT with a
    dump, after Ray's start replaced the handler), nothing left staged. Run again and SIGINT
    while it links the big file: exit 130, the same line. The third run links the big file
    alone, every row exactly once, and leaves no lease."""
    import signal
    import subprocess
    import sys

    import ray

    test = pq.read_table(synth_dir / "mentions" / "test.parquet")
    (tmp_path / "in").mkdir()
    small_rows = test.slice(0, 16)
    pq.write_table(small_rows, tmp_path / "in" / "a-small.parquet")
    images = GatedImages()
    held = test.set_column(test.column_names.index("image"), "image", pa.nulls(test.num_rows, pa.binary()))
    held = held.set_column(held.column_names.index("image_uri"), "image_uri",
                           pa.array([f"{images.url}/img.png?row={r}" for r in range(held.num_rows)]))
    held = held.set_column(0, "mention_id", pa.array([f"big-{i}" for i in range(held.num_rows)]))
    pq.write_table(held, tmp_path / "in" / "b-big.parquet")
    out = tmp_path / "out"
    small, big = (str(tmp_path / "in" / f) for f in ("a-small.parquet", "b-big.parquet"))
    args = [str(Path(sys.executable).parent / "otmel"), "link", "--model", onnx_model, "--index", s3_index[0].out,
            "--input", str(tmp_path / "in"), "--output", str(out), "--batch-size", "8", "--s3-endpoint", s3_server,
            "--allow-private-hosts", "--image-timeout", "600", *cli_options(ONE_ACTOR_EACH),
            "--address", ray.get_runtime_context().gcs_address]

    def interrupted(signum: int, ready, what: str, together: int = 1) -> tuple[list[str], list[str]]:
        """``together`` drivers started at once; once ``ready``, the one still running gets
        ``signum``. Returns (its stderr lines, the stderr lines of those that had ended)."""
        logs = [tmp_path / f"{signal.Signals(signum).name}-{i}.log" for i in range(together)]
        drivers = []
        for log in logs:
            with open(log, "w") as err:
                drivers.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err))
        try:
            # ... with all but one ended (refused); or at once if more than one went on to link
            _wait_for(lambda: (ready(" ".join(log.read_text(errors="replace") for log in logs))
                               and sum(d.poll() is None for d in drivers) <= 1)
                      or sum("otmel.jobs.link: linking" in log.read_text(errors="replace") for log in logs) > 1,
                      what, timeout=600, alive=lambda: any(d.poll() is None for d in drivers))
            running = [i for i, d in enumerate(drivers) if d.poll() is None]
            assert len(running) == 1, [d.returncode for d in drivers]
            drivers[running[0]].send_signal(signum)
            assert drivers[running[0]].wait(120) == 128 + signum, logs[running[0]].read_text()[-3000:]
        finally:
            for d in drivers:
                if d.poll() is None:
                    d.kill()
        texts = [log.read_text(errors="replace") for log in logs]
        for text in texts:
            assert "Traceback" not in text and "*** SIG" not in text and "Aborted" not in text, text[-3000:]
        return texts[running[0]].strip().splitlines(), [t for i, t in enumerate(texts) if i != running[0]]

    try:
        lines, others = interrupted(signal.SIGTERM, lambda _: (out / output_name(small)).exists() and images.waiting,
                                    "the small file's commit while the big one's images are held", together=2)
        refused = others[0].strip().splitlines()[-1]
        assert refused.startswith("otmel link: error:") and "another job is writing this output" in refused, refused
        kept = f"1 of 2 input file(s) committed in {out} and kept; re-run the same command to link the rest"
        assert lines[-1] == f"otmel link: interrupted by SIGTERM: {kept}", lines[-5:]
        assert not _staged_parts(out) and not (out / output_name(big)).exists()  # staged parts removed
        held_before = images.waiting  # the first run's fetches stay held
        lines, _ = interrupted(signal.SIGINT, lambda text: "linking 1 input file(s)" in text
                               and images.waiting > held_before, "the re-run linking the big file")
        assert lines[-1] == f"otmel link: interrupted by SIGINT: {kept}", lines[-5:]
        assert not (out / output_name(big)).exists()
        images.open()
        again = run(LinkConfig(model=onnx_model, index=s3_index[0].out, input=str(tmp_path / "in"), output=str(out),
                               batch_size=8, s3_endpoint=s3_server, allow_private_hosts=True, image_timeout_s=600,
                               **ONE_ACTOR_EACH))
    finally:
        images.close()
    assert again.summary["files_skipped_complete"] == 1 and again.summary["files_processed"] == 1
    rows = read_link_output(str(out))
    assert rows.num_rows == 16 + held.num_rows == len(set(rows.column("mention_id").to_pylist()))
    assert not _staged_parts(out) and not (out / "_otmel.lease").exists()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_lease_per_output_a_live_one_refuses_a_second_job_and_a_stale_one_is_taken_over(where, tmp_path,
                                                                                               s3_server, caplog):
    """Local (O_EXCL) and on the S3 endpoint (conditional PUT, If-None-Match): a second lease
    on an output held by a live job is refused in one line naming that job; released, the
    output can be leased again; a lease whose heartbeat is older than the stale bound (its job
    was SIGKILLed) is taken over with a warning; the heartbeat renews the record."""
    import logging

    from otmel.io.lease import LEASE_FILE, OutputBusy, OutputLease
    from otmel.io.storage import exists, join, read_bytes, write_bytes

    out = str(tmp_path / "out") if where == "local" else f"{BUCKET}/lease-{tmp_path.name}"
    first = OutputLease(out, s3_server, heartbeat_s=0.2)
    with first:
        with pytest.raises(OutputBusy, match=f"another job is writing this output .*job {first.record['job'][:12]}"):
            OutputLease(out, s3_server).acquire()
        beat = first.record["heartbeat"]
        time.sleep(0.6)
        assert json.loads(read_bytes(join(out, LEASE_FILE), s3_server))["heartbeat"] > beat  # renewed
    assert not exists(join(out, LEASE_FILE), s3_server)  # released
    with OutputLease(out, s3_server):
        pass
    # a job that was SIGKILLed: its lease stays, its heartbeat stops
    gone = {"job": "f" * 32, "command": "otmel link", "host": "elsewhere", "pid": 1, "started": 0, "heartbeat": 0}
    write_bytes(join(out, LEASE_FILE), json.dumps(gone).encode(), s3_server)
    with caplog.at_level(logging.WARNING, logger="otmel.io.lease"), OutputLease(out, s3_server) as taken:
        assert json.loads(read_bytes(join(out, LEASE_FILE), s3_server))["job"] == taken.record["job"]
    assert any("taking over the stale lease" in r.getMessage() and "ffffffffffff" in r.getMessage()
               for r in caplog.records)
    # a SIGKILLed driver on this host (its pid gone, or reused by a process started at
    # another time), heartbeat fresh: taken over at once, so the same command can resume
    import socket

    killed = dict(gone, job="e" * 32, host=socket.gethostname(), pid=os.getpid(), pid_started=1.0,
                  heartbeat=time.time())
    write_bytes(join(out, LEASE_FILE), json.dumps(killed).encode(), s3_server)
    with caplog.at_level(logging.WARNING, logger="otmel.io.lease"), OutputLease(out, s3_server):
        pass
    assert any("eeeeeeeeeeee" in r.getMessage() and "its process is gone" in r.getMessage() for r in caplog.records)


def test_best_threshold_is_the_max_f1_cut():
    from otmel.linking.calibration import best_threshold

    rng = np.random.default_rng(0)
    scores = rng.normal(size=200)
    correct = rng.random(200) < 1 / (1 + np.exp(-3 * scores))  # higher scores are right more often
    gold_in_kb = 180
    r = best_threshold(scores, correct, gold_in_kb)
    brute = []
    for t in scores:
        linked = scores >= t
        c = (linked & correct).sum()
        p, rc = c / linked.sum(), c / gold_in_kb
        brute.append((2 * p * rc / (p + rc) if c else 0.0, t))
    f1, t = max(brute)
    assert r["f1"] == pytest.approx(f1) and r["nil_threshold"] == pytest.approx(t)
    assert r["f1"] >= r["f1_no_threshold"]


def test_calibrate_stores_the_threshold_and_link_uses_it_by_default(s3_index, onnx_model, synth_dir, tmp_path, s3_server):
    import shutil

    from otmel.linking.calibration import CalibrateConfig, calibrate
    from otmel.jobs.link import preflight

    model = tmp_path / "model"
    shutil.copytree(onnx_model, model)
    r = calibrate(CalibrateConfig(model=str(model), index=s3_index[0].out, data=str(synth_dir), split="dev",
                                  s3_endpoint=s3_server))
    assert r["mentions"] == pq.read_metadata(synth_dir / "mentions" / "dev.parquet").num_rows
    assert json.loads((model / "export.json").read_text())["nil_threshold"] == r["nil_threshold"]
    cfg = LinkConfig(model=str(model), index=s3_index[0].out, input=str(synth_dir / "mentions"),
                     output=str(tmp_path / "o"), s3_endpoint=s3_server)
    assert preflight(cfg)["nil_threshold"] == r["nil_threshold"]
    assert preflight(LinkConfig(**{**cfg.to_dict(), "nil_threshold": 0.5}))["nil_threshold"] == 0.5


def test_cli_index_and_calibrate_run_through_their_configs(s3_index, onnx_model, synth_dir, tmp_path, capsys, s3_server):
    from otmel.cli.main import main

    code = main(["index", "--model", onnx_model, "--kb", str(tmp_path / "no-kb"), "--out", str(tmp_path / "i"),
                 "--shards", "2", "--factory", "Flat", "--feature-dtype", "fp32", "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no KB Parquet file" in err[0]
    assert main(["index", "--model", onnx_model, "--kb", "x", "--update", "y", "--out", "z"]) == 2
    code = main(["calibrate", "--model", onnx_model, "--index", s3_index[0].out, "--data", str(synth_dir),
                 "--dry-run", "--s3-endpoint", s3_server])
    out = capsys.readouterr().out
    assert code == 0 and "NIL threshold" in out and "not stored" in out
    assert json.loads((Path(onnx_model) / "export.json").read_text())["nil_threshold"] is None


def test_input_files_are_streamed_in_chunks_with_their_line_and_row_numbers(tmp_path):
    from otmel.linking.link_input import iter_mention_rows

    post = {"post_id": "p", "text": "hello Paris", "mentions": [{"mention": "Paris", "start": 6, "end": 11}]}
    lines = [json.dumps(dict(post, post_id=f"p{i}")) for i in range(2500)] + ["", "{bad"]
    (tmp_path / "x.jsonl").write_text("\n".join(lines))
    chunks = list(iter_mention_rows(str(tmp_path / "x.jsonl"), chunk_rows=1000))
    assert [c.num_rows for c in chunks] == [1000, 1000, 501]
    last = chunks[-1].to_pylist()[-1]
    assert last["mention_id"] == f"{tmp_path / 'x.jsonl'}:2502" and last["error"].startswith("bad_json: line 2502")
    pq.write_table(pa.table({"mention_id": [str(i) for i in range(3000)], "mention": ["a"] * 3000}),
                   tmp_path / "y.parquet", row_group_size=700)
    chunks = list(iter_mention_rows(str(tmp_path / "y.parquet"), chunk_rows=1000))
    assert [c.num_rows for c in chunks] == [700, 700, 700, 700, 200]  # a row group at a time
    assert chunks[4].column("source_row").to_pylist() == list(range(2800, 3000))


def test_a_mentions_row_without_text_is_flagged_or_with_require_text_an_error_row(tmp_path):
    """Parquet without a text column, and JSONL rows with no, null and blank text: each row is
    read with the warning no_context (linked on its mention string alone); --require-text
    makes each an empty_text error row instead, and rows with text stay as they were."""
    from otmel.linking.link_input import iter_mention_rows

    pq.write_table(pa.table({"mention_id": ["a", "b"], "mention": ["Paris", "Rome"]}), tmp_path / "m.parquet")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"mention_id": "c", "mention": "Paris"}, {"mention_id": "d", "mention": "Paris", "text": None},
        {"mention_id": "e", "mention": "Paris", "text": " \t"}, {"mention_id": "f", "mention": "Paris", "text": "Paris!"})))
    for name in ("m.parquet", "m.jsonl"):
        for require in (False, True):
            rows = pa.concat_tables(list(iter_mention_rows(str(tmp_path / name), require_text=require))).to_pylist()
            bare = [r for r in rows if r["mention_id"] != "f"]
            assert len(bare) == 2 if name == "m.parquet" else 3
            if require:
                assert all(r["preset"] == "error" and r["error"].startswith("empty_text") and r["warning"] is None
                           for r in bare), bare
            else:
                assert all(r["preset"] == "" and r["error"] is None and r["warning"] == "no_context" for r in bare), bare
            assert [(r["preset"], r["warning"]) for r in rows if r["mention_id"] == "f"] == \
                   ([] if name == "m.parquet" else [("", None)])


def test_a_text_over_the_cap_is_an_error_row_or_cut_and_a_giant_line_is_skipped_as_it_streams(tmp_path):
    """--max-text-bytes 1000 (lines then hold at most ~1.05 MiB): a 5 MB JSONL line (a giant
    field that is not the text) is one line_too_long row and the lines after it keep their
    numbers; a mention's 1,600-byte text is a text_too_long row, or with --truncate-text cut at
    a character boundary within 1,000 bytes (warning text_truncated); a post over the cap is
    one error row, or cut: its span inside the cut linked with the warning, the one past it a
    bad_span; a Parquet text over the cap is the same error row."""
    from otmel.linking.link_input import iter_mention_rows, max_line_bytes

    long_text = "é" * 800  # 1,600 UTF-8 bytes, 800 characters
    post_text = "Paris " + "x" * 2000 + " Rome"
    lines = [json.dumps({"mention_id": "m1", "mention": "Paris", "text": "in Paris"}),
             json.dumps({"mention_id": "giant", "mention": "Paris", "text": "in Paris", "junk": "z" * 5_000_000}),
             json.dumps({"mention_id": "m3", "mention": "Paris", "text": long_text}),
             json.dumps({"post_id": "p4", "text": post_text,
                         "mentions": [{"mention": "Paris", "start": 0, "end": 5},
                                      {"mention": "Rome", "start": len(post_text) - 4, "end": len(post_text)}]}),
             json.dumps({"mention_id": "m5", "mention": "Rome", "text": "Rome"})]
    (tmp_path / "x.jsonl").write_text("\n".join(lines))
    pq.write_table(pa.table({"mention_id": ["q1", "q2"], "mention": ["Paris", "Rome"], "text": ["ok", long_text]}),
                   tmp_path / "y.parquet")
    limits = dict(max_text_bytes=1000, max_image_bytes=1000)
    assert max_line_bytes(1000, 1000) < 1.1 * 2**20

    def read(name, **kw):
        rows = pa.concat_tables(list(iter_mention_rows(str(tmp_path / name), **limits, **kw))).to_pylist()
        return {r["mention_id"]: r for r in rows}

    rows = read("x.jsonl")
    assert rows[f"{tmp_path / 'x.jsonl'}:2"]["error"].startswith("line_too_long: line 2 is 50000")
    assert rows["m1"]["error"] is None and rows["m5"]["source_row"] == 5 and rows["m5"]["error"] is None
    assert rows["m3"]["error"].startswith("text_too_long: the text is 1600 bytes")
    assert rows["p4"]["error"].startswith("text_too_long") and len([r for r in rows.values() if r["post_id"] == "p4"]) == 1
    cut = read("x.jsonl", truncate_text=True)
    assert cut["m3"]["error"] is None and cut["m3"]["warning"] == "text_truncated" and cut["m3"]["text"] == "é" * 500
    assert cut["p4:0-5"]["warning"] == "text_truncated" and cut["p4:0-5"]["error"] is None
    assert [r["error"].split(":")[0] for r in cut.values() if r["post_id"] == "p4" and r["error"]] == ["bad_span"]
    assert cut["m1"]["warning"] is None and cut[f"{tmp_path / 'x.jsonl'}:2"]["error"].startswith("line_too_long")
    parquet = read("y.parquet")
    assert parquet["q1"]["error"] is None and parquet["q2"]["error"].startswith("text_too_long")


def test_a_bad_value_or_a_damaged_row_group_becomes_error_rows_and_the_rest_of_the_file_is_read(tmp_path):
    """Invalid UTF-8 in a Parquet string column, a JSONL line nested 100k deep and a Parquet
    row group whose page header is damaged (footer intact) are content problems, not storage
    failures: error rows with a reason, one per row lost, and every other row read."""
    from hostile_files import damage_row_group, deeply_nested_json_line, string_column_with_invalid_utf8

    from otmel.linking.link_input import iter_mention_rows

    def read(path, **kw):
        return pa.concat_tables(list(iter_mention_rows(str(path), **kw))).to_pylist()

    text = string_column_with_invalid_utf8([b"Paris is nice", b"\xff\xfe broken", b"Rome too"])
    pq.write_table(pa.table({"mention_id": ["a", "b", "c"], "mention": ["Paris", "x", "Rome"], "text": text}),
                   tmp_path / "utf.parquet")
    rows = read(tmp_path / "utf.parquet")
    assert [r["mention_id"] for r in rows] == ["a", f"{tmp_path / 'utf.parquet'}:1", "c"]
    assert rows[1]["error"].startswith("bad_text: row 1") and rows[0]["error"] is None and rows[2]["text"] == "Rome too"

    post = json.dumps({"post_id": "p", "text": "hello Paris", "mentions": [{"mention": "Paris", "start": 6, "end": 11}]})
    (tmp_path / "deep.jsonl").write_bytes(post.encode() + b"\n" + deeply_nested_json_line() + b"\n" + post.encode())
    rows = read(tmp_path / "deep.jsonl")
    assert [r["error"] is None for r in rows] == [True, False, True]
    assert rows[1]["error"].startswith("bad_json: line 2") and "nested" in rows[1]["error"]

    pq.write_table(pa.table({"mention_id": [f"m{i}" for i in range(10)], "mention": ["Paris"] * 10}),
                   tmp_path / "damaged.parquet", row_group_size=3)
    assert damage_row_group(tmp_path / "damaged.parquet", 1) == 3
    rows = read(tmp_path / "damaged.parquet", chunk_rows=2)
    assert [r["source_row"] for r in rows] == list(range(10))
    lost = [r for r in rows if r["error"]]
    assert [r["source_row"] for r in lost] == [3, 4, 5]
    assert all(r["error"].startswith("unreadable_row_group: row group 1 of") for r in lost)
    assert [r["mention_id"] for r in rows if not r["error"]] == ["m0", "m1", "m2", "m6", "m7", "m8", "m9"]


def test_read_chunks_are_bounded_by_bytes_when_rows_carry_images(tmp_path):
    """A chunk of 1,024 rows of inline images is 64 MB: rows this wide are read fewer at a
    time (Parquet from the footer's bytes per row, JSONL by line bytes), none lost."""
    from otmel.linking.link_input import iter_mention_rows

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes() for _ in range(300)]
    pq.write_table(pa.table({"mention_id": [str(i) for i in range(300)], "mention": ["a"] * 300, "image": images}),
                   tmp_path / "wide.parquet", row_group_size=128)
    chunks = list(iter_mention_rows(str(tmp_path / "wide.parquet"), chunk_rows=1000, chunk_bytes=400_000))
    assert max(c.num_rows for c in chunks) <= 10 and sum(c.num_rows for c in chunks) == 300
    assert pa.concat_tables(chunks).column("source_row").to_pylist() == list(range(300))
    line = json.dumps({"post_id": "p", "text": "x" * 100_000, "mentions": [{"mention": "x", "start": 0, "end": 1}]})
    (tmp_path / "wide.jsonl").write_text("\n".join(line.replace('"p"', f'"p{i}"') for i in range(50)))
    chunks = list(iter_mention_rows(str(tmp_path / "wide.jsonl"), chunk_rows=1000, chunk_bytes=250_000))
    assert [c.num_rows for c in chunks] == [3] * 16 + [2]


def test_calibrated_threshold_in_a_checkpoint_gives_nil_rows(trained_run, s3_index, synth_dir, tmp_path, s3_server):
    """calibrate stores its threshold in a checkpoint's config.json; link, given that
    checkpoint and no --nil-threshold, says nil exactly for the mentions scoring below it."""
    import shutil

    from otmel.linking.calibration import CalibrateConfig, calibrate

    _, train = trained_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(train.latest_checkpoint, ckpt)
    cal = calibrate(CalibrateConfig(model=str(ckpt), index=s3_index[0].out, data=str(synth_dir), split="dev",
                                    s3_endpoint=s3_server))
    threshold = cal["nil_threshold"]
    assert json.loads((ckpt / "config.json").read_text())["extra"]["nil_threshold"] == threshold
    assert cal["linked"] < cal["mentions"]  # the F1-best cut leaves some dev mentions unlinked
    r = run(LinkConfig(model=str(ckpt), index=s3_index[0].out, input=str(synth_dir / "mentions" / "dev.parquet"),
                       output=str(tmp_path / "out"), s3_endpoint=s3_server, **ONE_ACTOR_EACH))
    assert r.summary["nil_threshold"] == threshold
    rows = read_link_output(r.output).to_pylist()
    nil = [x for x in rows if x["status"] == "nil"]
    assert len(nil) >= 1 and r.summary["counts"]["nil"] == len(nil)
    for x in rows:
        assert x["status"] == ("nil" if x["score"] < threshold else "ok"), x
        assert x["candidates"] and x["score"] == x["candidates"][0]["score"]
        assert x["entity_id"] == (None if x["status"] == "nil" else x["candidates"][0]["entity_id"])


def test_a_jobs_ray_data_requests_expire_30_s_after_its_driver_stops_refreshing_them():
    """A job process (one that imports otmel.jobs, as every CLI command and library caller of
    a job does) sends Ray Data resource requests that expire after 30 s, not Ray's 180: a killed
    driver's request stops starving the cluster's other Ray Data jobs sooner (otmel/jobs
    package docstring: 54-60 s against 17 s for a training run in the two minutes after a
    killed link driver). A value the user set is kept."""
    import subprocess
    import sys

    from otmel.jobs import REQUEST_EXPIRE_ENV

    probe = ("import otmel.jobs.link, inspect\n"
             "from ray.data._internal.cluster_autoscaler.rate_based_cluster_autoscaler import RateBasedClusterAutoscaler\n"
             "print(inspect.signature(RateBasedClusterAutoscaler.__init__)"
             ".parameters['autoscaling_request_expire_time_s'].default)")
    env = {k: v for k, v in os.environ.items() if k != REQUEST_EXPIRE_ENV}
    for user_value, expected in ((None, "30"), ("90", "90")):
        run_env = env if user_value is None else {**env, REQUEST_EXPIRE_ENV: user_value}
        out = subprocess.run([sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == expected, out.stdout


def test_a_storage_error_raised_in_a_worker_is_found_in_the_drivers_exception():
    """Ray hands the driver a worker's exception as text (its chained causes do not survive the
    trip): the storage error is read from the traceback line the worker printed, under the
    class's real module path (a moved module once made every such job exit 1 with a traceback)."""
    from otmel.io.storage import StorageError, storage_failure

    worker = StorageError("s3://b/out/_staging/x.parquet: OSError: AWS Error INTERNAL_FAILURE")
    text = ("ray::MapWorker(MapBatches(LinkStage)).submit()\n  File \"storage.py\", line 198, in write_bytes\n"
            f"{type(worker).__module__}.StorageError: {worker}\n\nUDF failed to process a data block.")
    found = storage_failure(RuntimeError(text))
    assert isinstance(found, StorageError) and str(found) == str(worker)
    assert storage_failure(RuntimeError("a bug, not storage")) is None
