"""Object storage faults, applied from outside: a proxy in front of the S3 test endpoint
answers 503 SlowDown / 500, resets connections and delays answers for a share of the calls
(``fault_proxy.py``). The link job reads its input and index and writes its output through it.

* transient faults: bounded retries with backoff get every call through; the output equals
  a run on a healthy store, nothing is left staged, ``_SUCCESS.json`` counts every row;
* a permanent failure of the output store: the job fails with one line that names the
  output, and neither a committed file nor a ``_SUCCESS.json`` vouches for missing data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from conftest import ONE_ACTOR_EACH, cli_options
from fault_proxy import FaultProxy, Faults
from link_rows import assert_same_link_rows
from otmel.jobs.link import LinkConfig, run
from otmel.linking.link_output import read_link_output

OTMEL = str(Path(sys.executable).parent / "otmel")
BUCKET = "otmel-test"


@pytest.fixture(scope="module")
def on_s3(ray_local, model_and_index, synth_dir, s3_server):
    """Input mentions (two files) and the index on the S3 test endpoint."""
    from otmel.io.storage import upload_dir, write_bytes

    model, index = model_and_index
    for split in ("dev", "test"):
        write_bytes(f"s3://{BUCKET}/faults/in/{split}.parquet",
                    (synth_dir / "mentions" / f"{split}.parquet").read_bytes(), s3_server)
    upload_dir(index, f"s3://{BUCKET}/faults/index", s3_server)
    return dict(model=model, index=f"s3://{BUCKET}/faults/index", input=f"s3://{BUCKET}/faults/in",
                top_k=5, candidates=16, batch_size=32, **ONE_ACTOR_EACH)


def _keys(endpoint: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def _sorted_rows(out: str, endpoint: str) -> list[dict]:
    from otmel.io.storage import local_copy

    with local_copy(out, endpoint) as d:
        rows = read_link_output(str(d)).to_pylist()
    return sorted(rows, key=lambda r: r["mention_id"])


def test_transient_faults_are_retried_and_the_output_equals_a_healthy_run(on_s3, s3_server, record_property):
    clean = run(LinkConfig(**on_s3, output=f"s3://{BUCKET}/faults/out-clean", s3_endpoint=s3_server))
    faults = Faults(rate=0.15, seed=1, delay_s=0.2)
    with FaultProxy(s3_server, faults) as proxy:
        flaky = run(LinkConfig(**on_s3, output=f"s3://{BUCKET}/faults/out-flaky", s3_endpoint=proxy.endpoint))
    # every kind of fault happened, on reads and on writes
    assert set(faults.injected) == {"slowdown", "internal", "reset", "delay"}, faults.injected
    assert sum(faults.injected.values()) >= 20, faults.injected
    record_property("faults_injected", dict(faults.injected))  # figures for docs/reliability.md
    record_property("calls_forwarded", faults.forwarded)
    record_property("seconds_clean_flaky", [round(clean.summary["link_seconds"], 1), round(flaky.summary["link_seconds"], 1)])
    assert_same_link_rows(_sorted_rows(flaky.output, s3_server), _sorted_rows(clean.output, s3_server))
    keys = _keys(s3_server, "faults/out-flaky/")
    assert not [k for k in keys if "_staging" in k], keys
    success = json.loads(boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").get_object(
        Bucket=BUCKET, Key="faults/out-flaky/_SUCCESS.json")["Body"].read())
    assert success["counts"]["in"] == clean.summary["counts"]["in"] > 0


def test_a_permanent_output_failure_is_one_line_nothing_vouches_for_missing_data_and_no_staging_is_left(
        on_s3, s3_server, ray_local):
    """The output store accepts the job's probe and its staged parts, then refuses every write of
    a commit (403: a grant revoked in mid-job, as a full disk refuses a write; an output that
    refuses every write is refused before any work, by the probe): the job fails with one line
    naming the output; no committed file and no _SUCCESS.json vouches for missing data; and the
    job removes what it staged, saying so (a full disk stayed full of staged parts)."""
    faults = Faults(always=True, kinds=("forbidden",), methods=("PUT", "POST"), path_contains="/commit-")
    out = f"s3://{BUCKET}/faults/out-down"
    with FaultProxy(s3_server, faults) as proxy:
        args = [OTMEL, "link", "--model", on_s3["model"], "--index", on_s3["index"], "--input", on_s3["input"],
                "--output", out, "--candidates", "16", *cli_options(ONE_ACTOR_EACH), "--s3-endpoint", proxy.endpoint,
                "--address", ray_local.get_runtime_context().gcs_address]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("otmel link: error:") and "faults/out-down" in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert faults.injected.get("forbidden", 0) > 0
    removed = [line for line in proc.stderr.splitlines() if "staged file(s)" in line and "removed" in line]
    assert removed and "committed files are kept" in removed[0], proc.stderr[-3000:]
    keys = _keys(s3_server, "faults/out-down/")
    assert not [k for k in keys if k.endswith("_SUCCESS.json") or "/part-" in k.split("_staging")[0]], keys
    assert not [k for k in keys if "_staging" in k], keys  # neither parts nor half-written commits
