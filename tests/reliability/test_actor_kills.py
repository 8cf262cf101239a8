"""Actors and worker processes killed from outside while a link job runs: an index-shard
actor and an encode actor are killed through Ray (as ``ray.kill(handle, no_restart=False)``
does, by the ids in the GCS's actor table), then a link actor's worker process is SIGKILLed by
the PID the table gives. Ray restarts them and retries their calls; the job finishes
with every input mention exactly once (a retried link batch reports its part again: counted
once), one committed file per input, nothing left staged.

A hung encode actor (its process SIGSTOPped, as a process waiting on a hung device or mount
is: alive, answering nothing, failing nothing) stops the pipeline; after ``--stall-timeout``
the job ends that attempt, its actors with it, and restarts the pipeline for the files not
committed yet (the recovery that gets a job past Ray 2.60's deadlock after a node loss,
``jobs/link_pipeline.py``: ``PIPELINE_ATTEMPTS``); the output equals the session's reference rows."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from corpus import write_split_copies
from job_driver import JobDriver


def _staged(out: Path) -> int:
    root = out / "_staging"
    return sum(1 for p in root.rglob("*.parquet") if not p.name.startswith("commit-")) if root.exists() else 0


def _wait(predicate, what: str, driver: JobDriver, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert driver.poll() is None, f"the job ended before {what}:\n" + driver.output()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _alive(match: str) -> list:
    """ALIVE actors of this session's Ray instance (the GCS's actor table) whose worker process
    runs ``match`` by its title (Ray Data's pools: ``ray::MapWorker(MapBatches(Encode))``)."""
    from types import SimpleNamespace

    import psutil
    from ray._private.state import actors

    from otmel.io.worker_memory import worker_kind

    found = []
    for a in actors(actor_state_name="ALIVE").values():
        try:
            kind = worker_kind(psutil.Process(a["Pid"]).cmdline())
        except psutil.Error:
            continue
        if kind and match in kind:
            found.append(SimpleNamespace(actor_id=a["ActorID"], pid=a["Pid"]))
    return found


def _kill_through_ray(actor_id: str) -> None:
    """What ``ray.kill(handle, no_restart=False)`` asks of Ray, for an actor this process
    holds no handle to (the job's actors are anonymous, owned by its driver): the GCS's
    KillActorViaGcs call, restart allowed."""
    import grpc
    import ray
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(ray.get_runtime_context().gcs_address) as channel:
        reply = gcs_service_pb2_grpc.ActorInfoGcsServiceStub(channel).KillActorViaGcs(
            gcs_service_pb2.KillActorViaGcsRequest(actor_id=bytes.fromhex(actor_id), force_kill=True, no_restart=False),
            timeout=30)
    assert reply.status.code == 0, reply.status


def test_killed_shard_encode_and_link_actors_are_restarted_and_every_row_is_linked_once(ray_local, model_and_index,
                                                                                         synth_dir, tmp_path,
                                                                                         record_property):
    from otmel.linking.link_output import read_link_output

    onnx, index = model_and_index
    test = write_split_copies(synth_dir, tmp_path / "in", 4)
    out = tmp_path / "out"
    driver = JobDriver("link", "LinkConfig", dict(model=onnx, index=index, input=str(tmp_path / "in"), output=str(out),
                                                  batch_size=4, read_chunk_rows=8,
                                                  address=ray_local.get_runtime_context().gcs_address),
                       tmp_path / "driver.log")
    killed = {}
    try:
        # the encode pool first: it runs ahead of the link stage and Ray Data ends it when done
        _wait(lambda: _alive("Encode"), "the encode actor", driver)
        encode = _alive("Encode")[0]
        _kill_through_ray(encode.actor_id)
        killed["encode"] = encode.actor_id
        _wait(lambda: _staged(out) >= 2, "the first linked batches", driver)
        shard = _alive("ShardServer")[0]
        _kill_through_ray(shard.actor_id)
        killed["shard"] = shard.actor_id
        seen = _staged(out)
        _wait(lambda: _staged(out) >= seen + 3, "batches after the shard actor's restart", driver)
        link = _alive("LinkStage")[0]
        os.kill(link.pid, signal.SIGKILL)
        killed["link"] = link.actor_id
        t0 = time.monotonic()
        driver.wait(timeout=600)
        record_property("seconds_after_last_kill", round(time.monotonic() - t0, 1))  # figures for docs/reliability.md
    finally:
        driver.kill()  # a failed test leaves no job running (its actors end with their driver)
    assert driver.returncode == 0, driver.output()
    summary = json.loads((out / "_SUCCESS.json").read_text())
    rows = read_link_output(str(out))
    ids = rows.column("mention_id").to_pylist()
    assert len(ids) == len(set(ids)) == 4 * test.num_rows == summary["counts"]["in"], killed
    assert set(rows.column("status").to_pylist()) == {"ok"}
    assert len(list(out.glob("part-*.parquet"))) == 4 and not (out / "_staging").exists()
    assert summary["files_processed"] == 4
    # the faults were real: each actor hit was restarted by Ray
    from ray._private.state import actors

    restarts = {what: actors(actor_id=actor_id)["NumRestarts"] for what, actor_id in killed.items()}
    assert all(n >= 1 for n in restarts.values()), restarts


#: the stall test's --stall-timeout. Ray Data counts a block entering or leaving any step's
#: queue as progress; what can pause every step at once is an actor starting (process, imports,
#: model), a few seconds here and several times that on a loaded machine
STALL_S = 30


def test_a_hung_encode_actor_stalls_the_pipeline_and_the_job_restarts_it_for_the_uncommitted_files(
        ray_local, model_and_index, synth_dir, reference_link, s3_server, tmp_path, record_property):
    import pyarrow.parquet as pq

    from conftest import ONE_ACTOR_EACH, REFERENCE_CANDIDATES
    from fault_proxy import FaultProxy, Faults
    from link_rows import assert_same_link_rows

    from otmel.linking.link_output import read_link_output
    from otmel.io.storage import write_parquet

    # a small input and a large one, on the S3 endpoint behind a proxy that holds the large
    # one's reads until the small one is committed: the encode actor is hung with the large
    # file's rows all still to come, whatever the order and speed of the read tasks (read
    # freely, a quick encode actor could finish both files before the first commit landed)
    onnx, index = model_and_index
    inputs, out = f"s3://otmel-test/{tmp_path.name}/in", tmp_path / "out"
    ids: set[str] = set()
    for name, split, rows in (("a-small", "dev", 8), ("b-large", "train", None)):
        table = pq.read_table(synth_dir / "mentions" / f"{split}.parquet")
        table = table.slice(0, rows) if rows else table
        ids.update(table.column("mention_id").to_pylist())
        write_parquet(f"{inputs}/{name}.parquet", table, s3_server)
    faults = Faults(hold_reads_of="/b-large.parquet")
    with FaultProxy(s3_server, faults) as proxy:
        driver = JobDriver("link", "LinkConfig", dict(model=onnx, index=index, input=inputs, output=str(out),
                                                      batch_size=8, read_chunk_rows=16,
                                                      candidates=REFERENCE_CANDIDATES, stall_timeout_s=STALL_S,
                                                      s3_endpoint=proxy.endpoint, **ONE_ACTOR_EACH,
                                                      address=ray_local.get_runtime_context().gcs_address),
                           tmp_path / "driver.log")
        try:
            _wait(lambda: any(out.glob("part-*.parquet")), "the first committed file", driver)
            hung = _alive("MapBatches(Encode)")
            assert len(hung) == 1, hung
            os.kill(hung[0].pid, signal.SIGSTOP)  # the job's end of the attempt kills it (SIGKILL works on it)
            faults.release_reads()
            driver.wait(timeout=600)
        finally:
            driver.kill()
    log = driver.log.read_text(errors="replace")
    assert driver.returncode == 0, driver.output()
    assert faults.holding.is_set()  # the large file was read through the gate (its path matched)
    restarts = [line for line in log.splitlines() if "restarting it for the" in line]
    record_property("stall_restarts", [line[:220] for line in restarts])
    # restarted for the large file only: the small one was committed before, and kept
    assert restarts and f"moved no block for {STALL_S} s" in restarts[0], log[-3000:]
    assert "1 input file(s) committed so far; restarting it for the 1 not committed (attempt 2 of 3)" in restarts[0]
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert summary["files_processed"] == 2 and summary["counts"]["in"] == len(ids)
    reference = sorted((r for r in read_link_output(reference_link).to_pylist() if r["mention_id"] in ids),
                       key=lambda r: r["mention_id"])
    assert len(reference) == len(ids)
    assert_same_link_rows(sorted(read_link_output(str(out)).to_pylist(), key=lambda r: r["mention_id"]), reference)
    assert not (out / "_staging").exists()  # the stalled attempt's parts went with the staging dir
