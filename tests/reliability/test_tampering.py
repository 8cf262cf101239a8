"""Nothing trusted blindly: one flipped byte in any file of a model (checkpoint or ONNX
export) or of an index shard is refused with an error naming the file, by the library and
by the job (one line, exit code 2); a trusted rewrite (calibration's threshold) re-records
its checksum; credentials reach no output, metadata file or Ray's job table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "otmel-test-secret-4f2a9c"  # a credential no output may contain


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from otmel.factory import TINY, create_model, save_model
    from otmel.model import ModelConfig
    from otmel.synth import SYNTH_VOCABULARY

    torch.manual_seed(0)
    model, pre = create_model(ModelConfig(mode="kd", text_length=24, **TINY), tiny=True, words=SYNTH_VOCABULARY)
    return save_model(model, pre, tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_checkpoint_with_one_flipped_byte_is_refused_naming_the_file(checkpoint, tmp_path, name):
    from otmel.factory import load_model
    from otmel.model import CheckpointError

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    load_model(copy)  # the untouched copy loads
    flip_one_byte(copy / name)
    with pytest.raises(CheckpointError, match=f"{copy / name}: .*(sha256|bytes)"):
        load_model(copy)


@pytest.mark.parametrize("name", ["encoder.onnx", "matcher.onnx", "config.json", "tokenizer.json"])
def test_an_onnx_export_with_one_flipped_byte_is_refused_naming_the_file(model_and_index, tmp_path, name):
    from otmel.backend import load_backend
    from otmel.integrity import IntegrityError

    copy = tmp_path / "onnx"
    shutil.copytree(model_and_index[0], copy)
    flip_one_byte(copy / name)
    with pytest.raises(IntegrityError, match=f"{copy / name}: sha256 differs"):
        load_backend(str(copy))


def test_calibration_rewrites_the_threshold_and_its_checksum(checkpoint, tmp_path):
    from otmel.calibration import store_threshold
    from otmel.factory import load_model

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    store_threshold(str(copy), 0.25)
    model, _ = load_model(copy)
    assert model.config.extra["nil_threshold"] == 0.25


def test_the_link_job_refuses_a_tampered_index_shard_in_one_line(model_and_index, synth_dir, tmp_path):
    """Through the CLI, in its own process (a fresh local Ray): exit code 2, one line that
    names the shard file."""
    index = tmp_path / "index"
    shutil.copytree(model_and_index[1], index)
    manifest = json.loads((index / "manifest.json").read_text())
    victim = index / manifest["shards"][1]["dir"] / "features.npy"
    if not victim.exists():  # whatever the features file is called: the largest file of the shard
        victim = max((index / manifest["shards"][1]["dir"]).iterdir(), key=lambda p: p.stat().st_size)
    flip_one_byte(victim)
    proc = subprocess.run([sys.executable, "-m", "otmel.cli", "link", "--model", model_and_index[0], "--index",
                           str(index), "--input", str(synth_dir / "mentions" / "test.parquet"), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("otmel link: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and str(victim) in errors[0] and "checksum mismatch" in errors[0]
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()


def test_credentials_reach_no_output_metadata_or_job_table(model_and_index, synth_dir, tmp_path, s3_server):
    """Index, link and export on the S3 endpoint with a distinctive secret key, in a CLI
    process of their own: the secret is in no file they wrote, in none of their output, and
    not in Ray's job table (a runtime_env carrying AWS_* variables would put it there)."""
    import time

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="creds")
    started = time.time()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="otmel-test-key", AWS_SECRET_ACCESS_KEY=SECRET)
    probe = ("import json, ray, sys; from otmel.cli import main; code = main(sys.argv[1:]); "
             "from ray.util.state import list_jobs; "
             "print('JOBS', json.dumps([j.__dict__ if hasattr(j, '__dict__') else j for j in list_jobs(address=ray.get_runtime_context().gcs_address, detail=True)], "
             "default=str)); sys.exit(code)")
    outputs = []
    for argv in (["-v", "index", "--model", model_and_index[0], "--kb", str(synth_dir / "kb.parquet"), "--out",
                  "s3://creds/index", "--shards", "1", "--s3-endpoint", s3_server],
                 ["-v", "link", "--model", model_and_index[0], "--index", "s3://creds/index", "--input",
                  str(synth_dir / "mentions" / "test.parquet"), "--output", "s3://creds/out", "--s3-endpoint",
                  s3_server]):
        proc = subprocess.run([sys.executable, "-c", probe, *argv], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "JOBS [" in proc.stdout and "runtime_env" in proc.stdout  # the job table was read
        outputs.append(proc.stdout + proc.stderr)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="creds")["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys) and any(k.endswith("_SUCCESS.json") for k in keys)
    for key in keys:
        assert SECRET.encode() not in s3.get_object(Bucket="creds", Key=key)["Body"].read(), key
    for text in outputs:
        assert SECRET not in text
    # the Ray sessions the two CLI processes started: every log file of theirs
    sessions = [d for d in Path("/tmp/ray").glob("session_2*") if d.stat().st_mtime >= started - 1]
    logs = [p for d in sessions for p in (d / "logs").rglob("*") if p.is_file()]
    assert sessions and logs
    assert not [p for p in logs if SECRET.encode() in p.read_bytes()]
    export_json = Path(model_and_index[0]) / "export.json"
    assert SECRET not in export_json.read_text()
