"""otmel train on Ray Train: 2 CPU workers, checkpoints local and on S3, resume, failures."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from otmel.jobs.train import TrainConfig, preflight, run


def _state(ckpt_uri: str, s3_endpoint=None) -> dict:
    from otmel.io.storage import read_bytes

    return json.loads(read_bytes(f"{ckpt_uri}/train_state.json", s3_endpoint))


def test_two_worker_run_writes_checkpoints_metrics_and_plot(trained_run):
    from pathlib import Path

    from otmel.io.integrity import verify_checksums

    cfg, result = trained_run
    run_dir = Path(result.run_uri)
    state = _state(result.latest_checkpoint)
    assert state["epoch"] == 1
    assert state["step"] == result.metrics["step"] > 0
    for f in ("config.json", "model.safetensors", "optimizer.pt", "train_state.json", "tokenizer.json", "checksums.json"):
        assert (Path(result.latest_checkpoint) / f).is_file(), f
    verify_checksums(result.latest_checkpoint)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]
    assert all(math.isfinite(json.loads(x)["train_loss"]) for x in lines)
    assert "dev_MRR" in json.loads(lines[-1])
    assert (run_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_pair_is_trained_once_per_epoch_in_a_new_order(trained_run):
    """What the 2 workers actually trained on (gathered from them): each epoch every pair
    exactly once, in the (seed, epoch) order of the schedule, a different order each epoch."""
    import hashlib
    from pathlib import Path

    import numpy as np

    from otmel.data.pairs import load_split, usable_pairs
    from otmel.training.loop import global_batches

    cfg, result = trained_run
    kb, train = load_split(cfg.data, "train")
    n = len(usable_pairs(train, kb)[0])
    assert n % cfg.workers == 0  # so "every pair" is exact (see global_batches)
    epochs = [json.loads(x) for x in (Path(result.run_uri) / "metrics.jsonl").read_text().splitlines()]
    for m in epochs:
        assert m["pairs_total"] == m["pairs_seen"] == m["distinct_pairs_seen"] == n, m
        order = np.concatenate(global_batches(n, cfg.batch_size, cfg.seed, m["epoch"], cfg.workers)).astype(np.int64)
        assert m["order_sha256"] == hashlib.sha256(order.tobytes()).hexdigest()[:16]
    assert epochs[0]["order_sha256"] != epochs[1]["order_sha256"]


@pytest.mark.parametrize("n", [280, 283, 31, 16])
def test_global_batches_cover_the_epoch_and_split_exactly_across_workers(n):
    import numpy as np

    from otmel.training.loop import global_batches, worker_rows

    B = 16
    for world in (1, 2, 4):
        batches = global_batches(n, B, seed=3, epoch=0, world=world)
        flat = np.concatenate(batches)
        assert len(np.unique(flat)) == len(flat)  # never twice in an epoch
        missing = n - len(flat)
        tail = n % B
        assert missing == (tail % world if tail - tail % world >= 2 * world else tail)
        assert all(len(b) % world == 0 and len(b) // world >= 2 for b in batches)
        # rank r's rows, step by step, rebuild the global batches in rank order
        parts = [worker_rows(batches, r, world) for r in range(world)]
        for step, b in enumerate(batches):
            pieces = []
            for rows, sizes in parts:
                start = sum(sizes[:step])
                pieces.append(rows[start:start + sizes[step]])
            assert np.array_equal(np.concatenate(pieces), b)
    a, b = (np.concatenate(global_batches(n, B, 3, e)) for e in (0, 1))
    assert not np.array_equal(a, b) and np.array_equal(a, np.concatenate(global_batches(n, B, 3, 0)))


def _weights(ckpt_uri: str, s3_endpoint=None) -> dict:
    from safetensors.torch import load

    from otmel.io.storage import read_bytes

    return load(read_bytes(f"{ckpt_uri}/model.safetensors", s3_endpoint))


#: parameters whose gradient is exactly 0 in exact arithmetic (a key bias shifts every logit of
#: an attention row equally, and softmax ignores the shift): Adam turns their rounding-noise
#: gradients into +-lr steps, so two runs agree on them only up to lr per step
ZERO_GRADIENT_PARAMETERS = "self_attn.k_proj.bias"


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    import torch

    assert set(a) == set(b)
    off = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.allclose(a[k], b[k], atol=atol, rtol=0)}
    assert all(ZERO_GRADIENT_PARAMETERS in k for k in off), off


def test_two_workers_train_like_one_process_through_the_job(trained_run, tmp_path):
    """The Ray Train job with 1 worker and with 2 workers (global negatives gathered) takes
    the same steps: same losses, same weights after 2 epochs. The 2-worker run preprocessed
    inline, this one in Ray Data tasks: the two ways feed the same batches too."""
    cfg, two = trained_run
    assert cfg.preprocess == "inline"
    one = run(TrainConfig(**{**cfg.to_dict(), "workers": 1, "out": str(tmp_path), "eval_every": 0,
                             "preprocess": "tasks"}))
    _assert_same_weights(_weights(one.latest_checkpoint), _weights(two.latest_checkpoint), atol=1e-5)
    losses = [[json.loads(x)["train_loss"] for x in open(f"{r.run_uri}/metrics.jsonl")] for r in (one, two)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def _registered_checkpoints(run_uri: str, s3_endpoint) -> list:
    """Checkpoints Ray Train's controller has registered (its own snapshot in the run dir):
    files on storage alone are not yet a checkpoint a restart would restore from."""
    from otmel.io.storage import read_bytes

    try:
        return json.loads(read_bytes(f"{run_uri}/checkpoint_manager_snapshot.json", s3_endpoint))["checkpoint_results"]
    except FileNotFoundError:
        return []


def _kill_a_train_worker() -> int:
    """SIGKILLs a Ray Train worker of this session's Ray instance (not of another Ray on the machine)."""
    import os
    import signal

    from otmel.io.worker_memory import ray_workers

    for p, _ in ray_workers(("RayTrainWorker",), root_pid=os.getpid()):
        p.send_signal(signal.SIGKILL)
        return p.pid
    raise AssertionError("no Ray Train worker process found")


def test_killed_worker_is_restored_from_s3_and_the_run_ends_as_if_uninterrupted(trained_run, s3_server):
    """A training worker process is SIGKILLed from outside after the first checkpoint reached
    S3, while the store stalls (a proxy holds every later write, then drops what it held);
    FailureConfig restores the worker group from that checkpoint, and the run finishes with
    the weights of the uninterrupted run (which it can only do if weights AND optimizer were
    restored)."""
    import threading
    import time

    from fault_proxy import FaultProxy, Faults

    cfg, uninterrupted = trained_run
    faults = Faults(stall_writes_after="checkpoint_manager_snapshot.json")
    with FaultProxy(s3_server, faults) as proxy:
        flaky = TrainConfig(**{**cfg.to_dict(), "out": "s3://otmel-test/runs", "name": "flaky",
                               "s3_endpoint": proxy.endpoint, "max_failures": 1, "preprocess": "auto"})
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(result=run(flaky)), daemon=True)
        thread.start()
        deadline = time.monotonic() + 300
        while not _registered_checkpoints(flaky.run_uri, s3_server):  # uploaded AND registered by Ray Train
            assert thread.is_alive() and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        assert faults.stalled.is_set() and thread.is_alive()  # the run cannot have ended: it is stalled
        _kill_a_train_worker()
        faults.end_stall()
        thread.join(600)
    result = outcome["result"]
    state = _state(result.latest_checkpoint, s3_server)
    steps = _state(uninterrupted.latest_checkpoint)["step"] // 2
    assert [r["step"] for r in state["resumes"]] == [steps]  # restored from epoch 0's checkpoint
    assert state["step"] == 2 * steps and [h["epoch"] for h in state["history"]] == [0, 1]
    _assert_same_weights(_weights(result.latest_checkpoint, s3_server), _weights(uninterrupted.latest_checkpoint),
                         atol=1e-6)


def _checkpoint_digests(ckpt_uri: str, s3_endpoint=None) -> tuple[str, str]:
    """Digests of the model and optimizer state a checkpoint's files hold."""
    import io

    import torch

    from otmel.io.storage import read_bytes
    from otmel.training.loop import state_digest

    optimizer = torch.load(io.BytesIO(read_bytes(f"{ckpt_uri}/optimizer.pt", s3_endpoint)), weights_only=True)
    return state_digest(_weights(ckpt_uri, s3_endpoint)), state_digest(optimizer["optimizer"])


def test_killed_driver_then_resume_from_s3_twice_ends_as_if_uninterrupted(trained_run, s3_server):
    """The training driver (its own process, as `otmel train`, run storage on the S3 endpoint)
    is SIGKILLed after the first checkpoint is registered, while its store stalls (a proxy
    holds every later write); Ray ends its workers with it. The
    same command without --resume is refused (a run is never silently overwritten); with
    --resume, 2 workers copy the checkpoint from S3 (each rank into its own directory, verified
    by checksum) and continue from its step, ending with the uninterrupted run's weights.
    Resumed again for one more epoch, the audit trail grows: each restore's in-memory model
    and optimizer equal the files it restored from, and training continues from the saved
    step, not 0."""
    import signal
    import subprocess
    import sys
    import time

    import ray

    from otmel.jobs.train import find_latest_checkpoint

    from fault_proxy import FaultProxy, Faults

    cfg, uninterrupted = trained_run
    # the driver's S3 goes through a proxy that stalls every write after the first checkpoint
    # is registered: the run cannot end before the kill, however fast or slow the machine
    faults = Faults(stall_writes_after="checkpoint_manager_snapshot.json")
    with FaultProxy(s3_server, faults) as proxy:
        killed = TrainConfig(**{**cfg.to_dict(), "out": "s3://otmel-test/runs", "name": "killed",
                                "s3_endpoint": proxy.endpoint, "address": ray.get_runtime_context().gcs_address,
                                "preprocess": "auto"})
        code = f"from otmel.jobs.train import TrainConfig, run; run(TrainConfig(**{killed.to_dict()!r}))"
        driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while not _registered_checkpoints(killed.run_uri, s3_server):
                assert driver.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
                time.sleep(0.2)
            assert faults.stalled.is_set() and driver.poll() is None  # killed mid-run, not after it
            driver.send_signal(signal.SIGKILL)
            driver.wait(60)
        finally:
            if driver.poll() is None:
                driver.kill()
    killed = TrainConfig(**{**killed.to_dict(), "s3_endpoint": s3_server})
    with pytest.raises(ValueError, match="--resume"):
        preflight(killed)  # the same command without --resume is refused, never overwrites
    steps = _state(uninterrupted.latest_checkpoint)["step"] // 2
    resumed_from = find_latest_checkpoint(killed.run_uri, s3_server)
    expected = [_checkpoint_digests(resumed_from, s3_server)]  # before a resumed run may prune it

    result = run(TrainConfig(**{**killed.to_dict(), "resume": True, "address": None}))
    state = _state(result.latest_checkpoint, s3_server)
    assert [r["step"] for r in state["resumes"]] == [steps] and state["step"] == 2 * steps
    assert state["resumes"][0]["checkpoint"].endswith(resumed_from.rsplit("/", 1)[-1])
    _assert_same_weights(_weights(result.latest_checkpoint, s3_server), _weights(uninterrupted.latest_checkpoint),
                         atol=1e-6)
    expected.append(_checkpoint_digests(result.latest_checkpoint, s3_server))

    again = run(TrainConfig(**{**killed.to_dict(), "resume": True, "address": None, "epochs": 3}))
    state = _state(again.latest_checkpoint, s3_server)
    assert [r["step"] for r in state["resumes"]] == [steps, 2 * steps] and state["step"] == 3 * steps
    assert [h["epoch"] for h in state["history"]] == [0, 1, 2]
    assert state["resumes"][1]["checkpoint"].endswith(result.latest_checkpoint.rsplit("/", 1)[-1])
    assert [(r["model_sha256"], r["optimizer_sha256"]) for r in state["resumes"]] == expected


def _newer_copy(src, dst, step: int) -> None:
    """A complete copy of checkpoint ``src`` claiming ``step`` (its checksums re-recorded)."""
    import shutil

    from otmel.io.integrity import write_checksums

    shutil.copytree(src, dst)
    state = json.loads((dst / "train_state.json").read_text())
    (dst / "train_state.json").write_text(json.dumps(dict(state, step=step)))
    write_checksums(dst)


def test_resume_skips_a_checkpoint_whose_upload_was_interrupted(trained_run, tmp_path):
    """A newer checkpoint dir with a file missing or short (a driver killed mid-upload) is
    not the one a resume restores from: the newest complete one is."""
    import shutil

    from otmel.jobs.train import find_latest_checkpoint

    _, result = trained_run
    run_dir = tmp_path / "run"
    good = run_dir / "checkpoint_a"
    shutil.copytree(result.latest_checkpoint, good)
    step = _state(str(good))["step"]
    for name, damage in (("model.safetensors", "missing"), ("optimizer.pt", "short"), ("checksums.json", "missing")):
        partial = run_dir / "checkpoint_b"
        _newer_copy(good, partial, step + 1)
        if damage == "missing":
            (partial / name).unlink()
        else:
            (partial / name).write_bytes((partial / name).read_bytes()[:100])
        assert find_latest_checkpoint(str(run_dir)) == str(good), name
        shutil.rmtree(partial)
    _newer_copy(good, run_dir / "checkpoint_c", step + 1)
    assert find_latest_checkpoint(str(run_dir)) == str(run_dir / "checkpoint_c")  # complete: the newest wins


# ---------------------------------------------------------------------------- preflight errors
def _cfg(data, out, **kw):
    return TrainConfig(data=str(data), out=str(out), tiny_clip=True, batch_size=16, **kw)


def test_preflight_rejects_missing_columns_and_empty_splits(synth_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(synth_dir, bad)
    train = pq.read_table(bad / "mentions" / "train.parquet")
    pq.write_table(train.drop(["mention"]), bad / "mentions" / "train.parquet")
    with pytest.raises(ValueError, match="mention"):
        preflight(_cfg(bad, tmp_path / "o"))
    pq.write_table(train.slice(0, 0), bad / "mentions" / "train.parquet")
    with pytest.raises(ValueError, match="empty"):
        preflight(_cfg(bad, tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="kb.parquet"):
        preflight(_cfg(tmp_path / "nowhere", tmp_path / "o"))
    with pytest.raises(ValueError, match="multiple of --workers"):
        preflight(_cfg(synth_dir, tmp_path / "o", workers=3))
    with pytest.raises(ValueError, match="--preprocess"):
        preflight(_cfg(synth_dir, tmp_path / "o", preprocess="gpu"))


def test_an_unwritable_run_storage_fails_in_preflight(synth_dir, tmp_path):
    """Before any worker starts (it used to fail at the first checkpoint, an epoch later)."""
    from otmel.io.storage import StorageError

    (tmp_path / "afile").write_text("a file where the run storage's parent directory should be")
    with pytest.raises(StorageError, match="--out .*afile/runs is not writable"):
        preflight(_cfg(synth_dir, tmp_path / "afile" / "runs"))
    preflight(_cfg(synth_dir, tmp_path / "runs"))  # a writable one keeps nothing of the probe
    assert list((tmp_path / "runs").iterdir()) == []


def test_preflight_rejects_resume_with_another_mode(trained_run):
    cfg, _ = trained_run
    other = TrainConfig(**{**cfg.to_dict(), "mode": "ot", "resume": True})
    with pytest.raises(ValueError, match="mode='kd'"):
        preflight(other)


def test_unreachable_s3_endpoint_fails_fast_with_a_clear_error(synth_dir):
    import time

    from otmel.io.storage import StorageError

    t0 = time.monotonic()
    with pytest.raises(StorageError, match="s3://otmel-test"):
        preflight(_cfg(synth_dir, "s3://otmel-test/runs", s3_endpoint="http://127.0.0.1:9"))
    assert time.monotonic() - t0 < 120  # bounded retries, not a hang


def test_cli_train_reports_one_line_errors(capsys, tmp_path):
    from otmel.cli.main import main

    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--tiny-clip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and "kb.parquet" in err[0]


def test_cli_evaluate_prints_and_writes_json(trained_run, tmp_path, capsys):
    from otmel.cli.main import main

    cfg, result = trained_run
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", result.latest_checkpoint, "--data", cfg.data, "--split", "dev",
                 "--retrieve", "10", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert {"H@1", "MRR", "recall@10", "recall@10_top1"} <= set(metrics)
    assert "MRR" in capsys.readouterr().out
