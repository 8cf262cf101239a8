"""otmel train on Ray Train: 2 CPU workers, checkpoints local and on S3, resume, failures."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from otmel.jobs.train import TrainConfig, preflight, run


def _state(ckpt_uri: str, s3_endpoint=None) -> dict:
    from otmel.storage import read_bytes

    return json.loads(read_bytes(f"{ckpt_uri}/train_state.json", s3_endpoint))


def test_two_worker_run_writes_checkpoints_metrics_and_plot(trained_run):
    from pathlib import Path

    cfg, result = trained_run
    run_dir = Path(result.run_uri)
    state = _state(result.latest_checkpoint)
    assert state["epoch"] == 1
    # global batch 16 over 2 workers: steps = epochs * (pairs // 16)
    assert state["step"] == result.metrics["step"] > 0
    for f in ("config.json", "model.safetensors", "optimizer.pt", "train_state.json", "tokenizer.json"):
        assert (Path(result.latest_checkpoint) / f).is_file(), f
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]
    assert all(math.isfinite(json.loads(x)["train_loss"]) for x in lines)
    assert "dev_MRR" in json.loads(lines[-1])
    assert (run_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_reloads_with_identical_dev_metrics(trained_run):
    from otmel.data import load_split
    from otmel.evaluation import evaluate
    from otmel.factory import load_model

    cfg, result = trained_run
    last = _state(result.latest_checkpoint)["history"][-1]
    model, pre = load_model(result.latest_checkpoint)
    kb, dev = load_split(cfg.data, "dev")
    m = evaluate(model, pre, dev, kb)
    assert m["MRR"] == pytest.approx(last["dev_MRR"], abs=1e-9)
    assert m["H@1"] == pytest.approx(last["dev_H@1"], abs=1e-9)


def test_s3_run_then_resume_continues_from_the_saved_step(ray_local, synth_dir, s3_server):
    base = dict(data=str(synth_dir), out="s3://otmel-test/runs", mode="att", workers=2, batch_size=16, lr=1e-3,
                tiny_clip=True, name="s3run", s3_endpoint=s3_server, eval_every=0, model={"text_length": 24},
                max_failures=0)
    first = run(TrainConfig(epochs=1, **base))
    step1 = _state(first.latest_checkpoint, s3_server)["step"]
    assert first.latest_checkpoint.startswith("s3://otmel-test/runs/s3run/checkpoint_")
    with pytest.raises(ValueError, match="--resume"):
        preflight(TrainConfig(epochs=2, **base))  # an existing run is never silently overwritten
    second = run(TrainConfig(epochs=2, resume=True, **base))
    state = _state(second.latest_checkpoint, s3_server)
    assert state["epoch"] == 1
    assert state["step"] == 2 * step1  # one more epoch from the saved step, not from 0
    assert [h["epoch"] for h in state["history"]] == [0, 1]
    assert state["resumed_at_steps"] == [step1]


def test_worker_failure_is_survived_through_failure_config(ray_local, synth_dir, tmp_path, monkeypatch):
    from otmel.jobs import train as train_job

    from otmel.data import load_split, usable_pairs

    kb, train = load_split(synth_dir, "train")
    steps_per_epoch = len(usable_pairs(train, kb)[0]) // 16
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(train_job.FAIL_ONCE_ENV, str(marker))
    monkeypatch.setenv(train_job.FAIL_STEP_ENV, str(steps_per_epoch + 2))  # inside epoch 1
    cfg = TrainConfig(data=str(synth_dir), out=str(tmp_path / "runs"), mode="att", workers=2, epochs=2,
                      batch_size=16, lr=1e-3, tiny_clip=True, name="flaky", eval_every=0, max_failures=1,
                      model={"text_length": 24})
    result = run(cfg)
    assert marker.exists()  # the failure really happened
    state = _state(result.latest_checkpoint)
    assert state["epoch"] == 1 and [h["epoch"] for h in state["history"]] == [0, 1]
    # restored from the epoch-0 checkpoint, not restarted from scratch
    assert state["resumed_at_steps"] == [steps_per_epoch]
    assert state["step"] == 2 * steps_per_epoch


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


def test_preflight_rejects_resume_with_another_mode(trained_run):
    cfg, _ = trained_run
    other = TrainConfig(**{**cfg.to_dict(), "mode": "ot", "resume": True})
    with pytest.raises(ValueError, match="mode='kd'"):
        preflight(other)


def test_unreachable_s3_endpoint_fails_fast_with_a_clear_error(synth_dir):
    import time

    from otmel.storage import StorageError

    t0 = time.monotonic()
    with pytest.raises(StorageError, match="s3://otmel-test"):
        preflight(_cfg(synth_dir, "s3://otmel-test/runs", s3_endpoint="http://127.0.0.1:9"))
    assert time.monotonic() - t0 < 120  # bounded retries, not a hang


def test_cli_train_reports_one_line_errors(capsys, tmp_path):
    from otmel.cli import main

    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--tiny-clip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and "kb.parquet" in err[0]


def test_cli_evaluate_prints_and_writes_json(trained_run, tmp_path, capsys):
    from otmel.cli import main

    cfg, result = trained_run
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", result.latest_checkpoint, "--data", cfg.data, "--split", "dev",
                 "--retrieve", "10", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert {"H@1", "MRR", "recall@10", "recall@10_top1"} <= set(metrics)
    assert "MRR" in capsys.readouterr().out
