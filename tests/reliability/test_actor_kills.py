"""Actors and worker processes killed from outside while a link job runs: an index-shard
actor and an encode actor are killed through Ray (as ``ray.kill(handle, no_restart=False)``
does, by the ids Ray's state API lists), then a link actor's worker process is SIGKILLed by
the PID the state API gives. Ray restarts them and retries their calls; the job finishes
with every input mention exactly once (a retried link batch reports its part again: counted
once), one committed file per input, nothing left staged."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from corpus import write_split_copies


def _staged(out: Path) -> int:
    root = out / "_staging"
    return sum(1 for p in root.rglob("*.parquet") if not p.name.startswith("commit-")) if root.exists() else 0


def _wait(predicate, what: str, thread: threading.Thread, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert thread.is_alive(), f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _alive(match: str) -> list:
    """ALIVE actors whose class (Ray Data's pools: ``MapWorker(MapBatches(Encode))``) names ``match``."""
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
            if match in (a.class_name or "") or match in (a.repr_name or "")]


def _kill_through_ray(actor_id: str) -> None:
    """What ``ray.kill(handle, no_restart=False)`` does, for an actor this process holds no
    handle to (the job's actors are anonymous)."""
    import ray

    ray._private.worker.global_worker.core_worker.kill_actor(ray.ActorID.from_hex(actor_id), False)


def test_killed_shard_encode_and_link_actors_are_restarted_and_every_row_is_linked_once(model_and_index, synth_dir,
                                                                                         tmp_path, record_property):
    from otmel.jobs.link import LinkConfig, run
    from otmel.link_output import read_link_output

    onnx, index = model_and_index
    test = write_split_copies(synth_dir, tmp_path / "in", 4)
    out = tmp_path / "out"
    outcome: dict = {}

    def job():
        try:
            outcome["result"] = run(LinkConfig(model=onnx, index=index, input=str(tmp_path / "in"), output=str(out),
                                               batch_size=4, read_chunk_rows=8))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    killed = {}
    # the encode pool first: it runs ahead of the link stage and Ray Data ends it when done
    _wait(lambda: _alive("Encode"), "the encode actor", thread)
    encode = _alive("Encode")[0]
    _kill_through_ray(encode.actor_id)
    killed["encode"] = encode.actor_id
    _wait(lambda: _staged(out) >= 2, "the first linked batches", thread)
    shard = _alive("ShardServer")[0]
    _kill_through_ray(shard.actor_id)
    killed["shard"] = shard.actor_id
    seen = _staged(out)
    _wait(lambda: _staged(out) >= seen + 3, "batches after the shard actor's restart", thread)
    link = _alive("LinkStage")[0]
    os.kill(link.pid, signal.SIGKILL)
    killed["link pid"] = link.pid
    t0 = time.monotonic()
    thread.join(600)
    record_property("seconds_after_last_kill", round(time.monotonic() - t0, 1))  # figures for docs/reliability.md
    assert "error" not in outcome, outcome.get("error")
    r = outcome["result"]
    rows = read_link_output(str(out))
    ids = rows.column("mention_id").to_pylist()
    assert len(ids) == len(set(ids)) == 4 * test.num_rows == r.summary["counts"]["in"], killed
    assert set(rows.column("status").to_pylist()) == {"ok"}
    assert len(list(out.glob("part-*.parquet"))) == 4 and not (out / "_staging").exists()
    assert json.loads((out / "_SUCCESS.json").read_text())["files_processed"] == 4
