"""On a real multi-node Ray cluster on this machine (`otmel cluster local`: head + worker nodes
started by Ray's autoscaler with the fake multi-node provider, token auth on):

* the data jobs joined with --address give the index (checksums) and the link rows of a
  one-node run (issue 10: the session's reference index and link rows, tests/conftest.py;
  the index joined with --address auto, the link rows from the scale-up test's submitted job);
* `otmel submit/status/logs/stop/jobs` through the Jobs API, a refused submit without the
  token, `otmel scale` up and down, a job submitted while scaled up using the new nodes
  (issue 11).

Its cluster is its own (the session's local Ray instance idles meanwhile): `otmel cluster
local` started once for the module and shared by its tests; the last one stops it mid-job, as
the other cluster a job without --address must not join.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ONE_ACTOR_EACH, cli_options
from link_rows import assert_same_link_rows

OTMEL = str(Path(sys.executable).parent / "otmel")
#: head + 1 worker node, autoscaling to 3 nodes: the fewest that show work spread over nodes
#: and a scale-up adding a node (every node costs the machine a raylet and its agents)
NODES, MAX_NODES = 2, 3


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(extra)
    return env


def otmel(*args, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([OTMEL, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"otmel {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def data(onnx_model, synth_dir, local_index, tmp_path_factory):
    """This module's working directory: the session's (tiny) ONNX model, synth set and
    one-node index linked in as ``onnx``, ``synth`` and ``index-1``; every run here writes
    beside them. The jobs' outputs are compared between runs, not judged for accuracy."""
    root = tmp_path_factory.mktemp("cluster-data")
    for name, target in (("onnx", onnx_model), ("synth", synth_dir), ("index-1", local_index)):
        (root / name).symlink_to(target, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def one_node(data, reference_link):
    """The reference: the session's index and its link rows (candidates 32), both made on a
    one-node local Ray instance."""
    return data / "index-1", Path(reference_link)


def _start_cluster(directory: Path, *args) -> dict:
    """`otmel cluster local ARGS` in ``directory``; the S3 credentials reach the workers
    through the environment of the nodes (never the job spec)."""
    env = _env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    proc = otmel("cluster", "local", *args, "--dir", directory, env=env, check=False, timeout=300)
    state = json.loads((directory / "state.json").read_text()) if (directory / "state.json").exists() else None
    if proc.returncode != 0:
        if state is not None:
            otmel("cluster", "down", "--dir", directory, check=False, timeout=120)
        raise AssertionError(proc.stdout + proc.stderr)
    return {**state, "client_env": _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=state["token_file"])}


def _stop_cluster(state: dict) -> None:
    """`otmel cluster down`, then no process of the cluster may be left (once: the last test
    stops the module's cluster itself)."""
    from otmel.cluster.local import _processes_under

    if state.get("stopped"):
        return
    state["stopped"] = True
    otmel("cluster", "down", "--dir", state["directory"], timeout=120)
    left = _processes_under(state["temp_dir"])
    assert not left, f"processes of the cluster left running: {left}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """`otmel cluster local --nodes 2 --autoscale --max-nodes 3`: head + 1 worker node (2 CPUs
    each), token auth on, started while another process holds the ports a Ray head takes by
    default (52365 job agent, 10001 client server), as a second Ray on a shared machine does."""
    import socket

    held = []
    for port in (52365, 10001):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:  # held already, by another process (the other suites' Ray, in make test's other lane)
            s.close()
            continue
        s.listen()
        held.append(s)
    try:
        state = _start_cluster(tmp_path_factory.mktemp("cluster"), "--nodes", NODES, "--autoscale",
                               "--max-nodes", MAX_NODES)
        yield state
        _stop_cluster(state)
    finally:
        for s in held:
            s.close()


def _index_digests(index_dir: Path) -> dict:
    manifest = json.loads((index_dir / "manifest.json").read_text())
    return {s["name"]: (s["count"], s["files"]) for s in manifest["shards"]}


def _rows(out) -> list[dict]:
    from otmel.linking.link_output import read_link_output

    rows = read_link_output(str(out)).to_pylist()
    return sorted(rows, key=lambda r: r["mention_id"])


def _state(cluster, what: str, **filters) -> list:
    """Ray's state API on the cluster, with that cluster's token in the header (Ray's own
    token loader keeps the first token a process saw)."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=cluster["dashboard_url"], headers={
        "Content-Type": "application/json",
        "Authorization": f"Bearer {Path(cluster['token_file']).read_text().strip()}"})
    resource = {"nodes": StateResource.NODES, "actors": StateResource.ACTORS, "tasks": StateResource.TASKS}[what]
    options = ListApiOptions(filters=[(k, "=", v) for k, v in filters.items()], limit=10_000, detail=True)
    return client.list(resource, options, raise_on_missing_output=False)


def _alive_nodes(cluster) -> list:
    return [n for n in _state(cluster, "nodes") if n.state == "ALIVE"]


def test_an_index_built_on_two_nodes_equals_the_one_node_index(cluster, one_node, data):
    """--address auto with the shell's RAY_ADDRESS: the index job says it joined that cluster,
    its encode and builder actors ran on more than one node, and its shard files are the
    one-node index's (sha256). (Link rows on several nodes equal the one-node rows: the
    scale-up test's submitted job here, and the node-loss test's joined with --address
    HOST:PORT.)"""
    env = cluster["client_env"]
    assert len(_alive_nodes(cluster)) == NODES
    joined = otmel("index", "--model", data / "onnx", "--kb", data / "synth" / "kb.parquet", "--out",
                   data / "index-3", "--shards", 2, "--workers", 2, "--address", "auto",
                   env={**env, "RAY_ADDRESS": cluster["gcs_address"]})
    assert f"joined the Ray cluster at {cluster['gcs_address']}" in joined.stderr, joined.stderr[-2000:]
    assert _index_digests(data / "index-3") == _index_digests(one_node[0])
    used = {a.node_id for a in _state(cluster, "actors") if a.class_name.endswith("ShardBuilder")
            or "MapBatches" in (a.class_name or "")}
    assert len(used) >= 2, used


def test_a_failing_job_exits_nonzero_with_its_error_line(cluster, data):
    proc = otmel("submit", "--address", cluster["dashboard_url"], "--wait", "link", "--", "--model", data / "onnx",
                 "--index", data / "no-such-index", "--input", data / "synth" / "mentions", "--output",
                 data / "never", env=cluster["client_env"], check=False)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "FAILED" in last and "otmel link: error:" in last and "no-such-index" in last, last


def test_a_long_job_is_stopped(cluster, data):
    proc = otmel("submit", "--address", cluster["dashboard_url"], "train", "--", "--data", data / "synth", "--out",
                 data / "long-run", "--tiny-clip", "--epochs", 1000, "--workers", 1, env=cluster["client_env"])
    job_id = proc.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 120
    while "RUNNING" not in otmel("status", job_id, "--address", cluster["dashboard_url"],
                                 env=cluster["client_env"], check=False).stdout:
        assert time.monotonic() < deadline, "the train job never started"
        time.sleep(1)
    stop = otmel("stop", job_id, "--address", cluster["dashboard_url"], env=cluster["client_env"])
    assert stop.stdout.strip() == f"{job_id}: STOPPED"
    status = otmel("status", job_id, "--address", cluster["dashboard_url"], env=cluster["client_env"], check=False)
    assert status.returncode == 1 and "STOPPED" in status.stdout


def test_a_submit_without_the_token_or_with_a_wrong_one_is_refused(cluster, data, tmp_path):
    args = ("submit", "--address", cluster["dashboard_url"], "link", "--", "--model", data / "onnx", "--index",
            data / "index-1", "--input", data / "synth" / "mentions", "--output", tmp_path / "x")
    no_token = otmel(*args, env=_env(HOME=str(tmp_path)), check=False)
    assert no_token.returncode == 2 and ("401" in no_token.stderr or "uthentication" in no_token.stderr), no_token.stderr
    (tmp_path / "wrong").write_text("0" * 64)
    wrong = otmel(*args, "--token-file", tmp_path / "wrong", env=_env(HOME=str(tmp_path)), check=False)
    assert wrong.returncode == 2 and ("403" in wrong.stderr or "uthentication" in wrong.stderr), wrong.stderr
    assert not (tmp_path / "x").exists()


def _wait_for_nodes(cluster, n: int, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(_alive_nodes(cluster)) != n:
        assert time.monotonic() < deadline, what
        time.sleep(2)


def test_scale_up_then_a_submitted_job_links_to_s3_on_the_new_nodes_and_clear_lets_them_go(cluster, one_node, data,
                                                                                            s3_server):
    """`otmel scale` adds the nodes asked for and holds them; `otmel submit --wait` streams a
    link job that writes to S3 and uses the new nodes (its rows are the one-node rows, no
    staging left; `status`, `logs` and `jobs` report it); `scale --clear` lets them go."""
    import boto3

    from otmel.io.storage import local_copy

    env = cluster["client_env"]
    # the earlier jobs' demand may have added a node for a while: idle ones go after 6 s
    _wait_for_nodes(cluster, NODES, "the cluster did not settle at its minimum size")
    before = {n.node_id for n in _alive_nodes(cluster)}
    assert len(before) == NODES
    # every node has 2 CPUs: 2 x MAX_NODES CPUs need MAX_NODES nodes
    up = otmel("scale", "--address", cluster["gcs_address"], "--cpus", 2 * MAX_NODES, "--timeout", 120, env=env)
    assert f"before: {NODES} node(s)" in up.stdout and f"after: {MAX_NODES} node(s)" in up.stdout, up.stdout
    up_at = time.monotonic()
    new = {n.node_id for n in _alive_nodes(cluster)} - before
    assert len(new) == MAX_NODES - NODES
    assert any(a.name == "AutoscalingCoordinator" and a.state == "ALIVE" for a in _state(cluster, "actors"))
    # the cluster's processes, the new node's too, run in a session of their own, not the
    # terminal's (here the test's): beside CPU-bound work in the terminal's session a submitted
    # job's driver got ~1% of a core on Linux (autogroup scheduling; tests/README.md)
    from otmel.cluster.local import _processes_under

    sessions = set()
    for pid in _processes_under(cluster["temp_dir"]):  # raylets, GCS, agents, monitors
        with contextlib.suppress(ProcessLookupError):  # ended since it was listed
            sessions.add(os.getsid(pid))
    assert sessions and os.getsid(0) not in sessions, "the cluster's processes share the terminal's session"
    out = "s3://otmel-test/cluster-out"
    proc = otmel("submit", "--address", cluster["dashboard_url"], "--wait", "link", "--", "--model", data / "onnx",
                 "--index", one_node[0], "--input", data / "synth" / "mentions", "--output", out,
                 "--candidates", 32, "--workers", 4, "--s3-endpoint", s3_server, env=env)
    job_id = proc.stdout.splitlines()[0].strip()
    assert "SUCCEEDED" in proc.stderr and "linked" in proc.stdout  # the job's own summary, streamed
    with local_copy(out, s3_server) as d:
        assert_same_link_rows(_rows(d), _rows(one_node[1]))
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket="otmel-test", Prefix="cluster-out/")["Contents"]]
    assert "cluster-out/_SUCCESS.json" in keys and not any("_staging" in k for k in keys)
    status = otmel("status", job_id, "--address", cluster["dashboard_url"], env=env)
    assert status.stdout.startswith(f"{job_id}: SUCCEEDED")
    logs = otmel("logs", job_id, "--address", cluster["dashboard_url"], env=env)
    assert "linked" in logs.stdout
    listing = otmel("jobs", "--address", cluster["dashboard_url"], env=env)
    assert any(line.startswith(job_id) and "SUCCEEDED" in line and "otmel link" in line
               for line in listing.stdout.splitlines())
    ray_job = next(j for j in __import__("ray.job_submission", fromlist=["x"]).JobSubmissionClient(
        cluster["dashboard_url"], headers={"Authorization": f"Bearer {Path(cluster['token_file']).read_text()}"}
    ).list_jobs() if j.submission_id == job_id).job_id
    ran_on = {t.node_id for t in _state(cluster, "tasks", job_id=ray_job)} | \
             {a.node_id for a in _state(cluster, "actors", job_id=ray_job)}
    assert ran_on & new, (ran_on, new)
    # Ray Data's AutoscalingCoordinator, left by the earlier link jobs, rewrites the cluster's
    # one resource request every 20 s: the new nodes must outlive that and the 6 s idle timeout,
    # so they are checked 30 s after the scale-up at the earliest and 10 s after the job left
    # them idle (minimum waits: a loaded machine only makes them longer)
    time.sleep(max(up_at + 30 - time.monotonic(), 10))
    assert new <= {n.node_id for n in _alive_nodes(cluster)}, "the scaled-up nodes were removed while requested"
    down = otmel("scale", "--address", cluster["gcs_address"], "--clear", env=env)
    assert "request cleared" in down.stdout and f"{MAX_NODES} node hold(s) released" in down.stdout, down.stdout
    _wait_for_nodes(cluster, NODES, "idle nodes were not removed after --clear")  # back to min_workers (which nodes stay is the autoscaler's choice)


def test_without_address_a_job_has_its_own_ray_while_another_cluster_comes_and_goes(cluster, data, one_node):
    """The embedded default is embedded (issue 14). Another Ray cluster runs on the machine (this
    module's, so it runs last) and the shell exports RAY_ADDRESS for it (as its users do):
    without --address the job starts its own local instance and says so, the other cluster is
    stopped mid-job by its own shutdown (`otmel cluster down`, which stops that cluster's
    processes only: `ray stop` would kill every Ray on the machine), and the job still writes
    every row. (`--address auto` joining RAY_ADDRESS's cluster: the two-node test.)"""
    env = _env(RAY_AUTH_MODE="disabled", RAY_ADDRESS=cluster["gcs_address"])
    args = ["link", "--model", data / "onnx", "--index", one_node[0], "--input", data / "synth" / "mentions",
            "--candidates", 32, *cli_options(ONE_ACTOR_EACH)]
    proc = subprocess.Popen([OTMEL, *map(str, args), "--output", str(data / "out-own")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "started a local Ray instance" in line:
                break
        assert any("RAY_ADDRESS" in line and "ignored" in line for line in seen), "".join(seen)[-3000:]
        # the job's driver is paused while the other cluster stops (its shutdown, ordered, can
        # take longer than this small job): the job is mid-way whatever the machine's speed
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            _stop_cluster(cluster)
            assert proc.poll() is None, "the job ended before the other cluster was stopped"
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(seen)[-2000:] + err[-3000:]
    assert_same_link_rows(_rows(data / "out-own"), _rows(one_node[1]))
