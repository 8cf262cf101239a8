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
from conftest import ONE_ACTOR_EACH, ONE_ENCODE_ACTOR, cli_options

SECRET = "otmel-test-secret-4f2a9c"  # a credential no output may contain


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from otmel.model.factory import TINY, create_model, save_model
    from otmel.model.otmel import ModelConfig
    from otmel.data.synth import SYNTH_VOCABULARY

    torch.manual_seed(0)
    model, pre = create_model(ModelConfig(mode="kd", text_length=24, **TINY), tiny=True, words=SYNTH_VOCABULARY)
    return save_model(model, pre, tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_checkpoint_with_one_flipped_byte_is_refused_naming_the_file(checkpoint, tmp_path, name):
    from otmel.model.factory import load_model
    from otmel.model.otmel import CheckpointError

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    load_model(copy)  # the untouched copy loads
    flip_one_byte(copy / name)
    with pytest.raises(CheckpointError, match=f"{copy / name}: .*(sha256|bytes)"):
        load_model(copy)


@pytest.mark.parametrize("name", ["encoder.onnx", "matcher.onnx", "config.json", "tokenizer.json"])
def test_an_onnx_export_with_one_flipped_byte_is_refused_naming_the_file(model_and_index, tmp_path, name):
    from otmel.backend import load_backend
    from otmel.io.integrity import IntegrityError

    copy = tmp_path / "onnx"
    shutil.copytree(model_and_index[0], copy)
    flip_one_byte(copy / name)
    with pytest.raises(IntegrityError, match=f"{copy / name}: sha256 differs"):
        load_backend(str(copy))


def test_calibration_rewrites_the_threshold_and_its_checksum(checkpoint, tmp_path):
    from otmel.linking.calibration import store_calibration
    from otmel.model.factory import load_model

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    store_calibration(str(copy), {"nil_threshold": 0.25})
    model, _ = load_model(copy)
    assert model.config.extra["nil_threshold"] == 0.25


@pytest.fixture(scope="module")
def cli_process(model_and_index, synth_dir, tmp_path_factory, s3_server):
    """ONE CLI process (one local Ray instance) with a distinctive secret key in its
    environment runs: ``otmel -v index`` and ``otmel -v link`` on the S3 endpoint, then
    ``otmel link`` against a local copy of the index with one flipped byte in a shard file;
    it prints the exit codes and Ray's job table."""
    import time

    import boto3

    root = tmp_path_factory.mktemp("cli")
    index = root / "tampered-index"
    shutil.copytree(model_and_index[1], index)
    manifest = json.loads((index / "manifest.json").read_text())
    victim = max((index / manifest["shards"][1]["dir"]).iterdir(), key=lambda p: p.stat().st_size)
    flip_one_byte(victim)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="creds")
    test = str(synth_dir / "mentions" / "test.parquet")
    runs = [["-v", "index", "--model", model_and_index[0], "--kb", str(synth_dir / "kb.parquet"), "--out",
             "s3://creds/index", "--shards", "1", *cli_options(ONE_ENCODE_ACTOR), "--s3-endpoint", s3_server],
            ["-v", "link", "--model", model_and_index[0], "--index", "s3://creds/index", "--input", test, "--output",
             "s3://creds/out", *cli_options(ONE_ACTOR_EACH), "--s3-endpoint", s3_server],
            ["link", "--model", model_and_index[0], "--index", str(index), "--input", test, "--output",
             str(root / "out"), *cli_options(ONE_ACTOR_EACH)]]
    probe = ("import json, ray, sys; from otmel.cli.main import main\n"
             f"codes = [main(argv) for argv in {runs!r}]\n"
             "from ray.util.state import list_jobs\n"
             "jobs = list_jobs(address=ray.get_runtime_context().gcs_address, detail=True)\n"
             "print('CODES', json.dumps(codes)); print('JOBS', json.dumps([j.__dict__ for j in jobs], default=str))")
    env = dict(os.environ, AWS_ACCESS_KEY_ID="otmel-test-key", AWS_SECRET_ACCESS_KEY=SECRET)
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(next(line[6:] for line in proc.stdout.splitlines() if line.startswith("CODES ")))
    return {"codes": codes, "stdout": proc.stdout, "stderr": proc.stderr, "started": started, "victim": victim,
            "out": root / "out"}


def test_the_link_job_refuses_a_tampered_index_shard_in_one_line(cli_process):
    """Exit code 2 and one line that names the shard file (from the shard actor's creation
    error), nothing written."""
    errors = [line for line in cli_process["stderr"].splitlines() if line.startswith("otmel link: error:")]
    assert cli_process["codes"][2] == 2, cli_process["stderr"][-3000:]
    assert len(errors) == 1 and str(cli_process["victim"]) in errors[0] and "checksum mismatch" in errors[0]
    assert not (cli_process["out"] / "_SUCCESS.json").exists()


def test_credentials_reach_no_output_metadata_or_job_table(cli_process, model_and_index, s3_server):
    """The secret key is in no file index and link wrote on S3, in none of their output
    (verbose), in no log of their Ray session, and not in Ray's job table (a runtime_env
    carrying AWS_* variables would put it there), nor in the export."""
    import boto3

    assert cli_process["codes"][:2] == [0, 0], cli_process["stderr"][-3000:]
    assert "JOBS [" in cli_process["stdout"] and "runtime_env" in cli_process["stdout"]  # the job table was read
    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="creds")["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys) and any(k.endswith("_SUCCESS.json") for k in keys)
    for key in keys:
        assert SECRET.encode() not in s3.get_object(Bucket="creds", Key=key)["Body"].read(), key
    assert SECRET not in cli_process["stdout"] + cli_process["stderr"]
    # the Ray session the CLI process started: every log file of it
    sessions = [d for d in Path("/tmp/ray").glob("session_2*") if d.stat().st_mtime >= cli_process["started"] - 1]
    logs = [p for d in sessions for p in (d / "logs").rglob("*") if p.is_file()]
    assert sessions and logs
    assert not [p for p in logs if SECRET.encode() in p.read_bytes()]
    assert SECRET not in (Path(model_and_index[0]) / "export.json").read_text()
