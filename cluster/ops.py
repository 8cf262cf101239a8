"""Cluster operations on Ray's own machinery: submit otmel commands as Ray jobs (Jobs API),
watch and stop them, ask the autoscaler for capacity and hold it (:func:`scale`), and a local
multi-node cluster on this machine for trying all of it (Ray's fake multi-node provider).

Addresses: the Jobs API is the head's dashboard port (``http://HEAD:8265``); scaling talks
to the GCS (``HEAD:6379``), because the autoscaler reads resource requests from there.

Token authentication: a cluster the project starts or documents runs with
``RAY_AUTH_MODE=token``. The client side looks for the token as Ray does (``RAY_AUTH_TOKEN``,
then the file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``) unless a
``--token-file`` is given, and sends it as an ``Authorization: Bearer`` header. A request
without it is refused by the cluster (HTTP 401), which is reported as such.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: the otmel commands that run as cluster jobs
JOB_COMMANDS = ("train", "index", "link", "evaluate", "export", "calibrate")
#: terminal Ray job states
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: how long a submit retries while the head's job agent is not available yet
AGENT_WAIT_S = 60.0
#: where ``otmel cluster local`` keeps its state unless ``--dir`` says otherwise
LOCAL_CLUSTER_DIR = Path(os.environ.get("OTMEL_LOCAL_CLUSTER_DIR", Path.home() / ".otmel" / "local-cluster"))


class ClusterError(RuntimeError):
    """A cluster operation that cannot be done (unreachable, refused, timed out)."""


# ---------------------------------------------------------------------------- auth
def find_token(token_file: str | None = None) -> str | None:
    """The cluster token: ``token_file``, else Ray's own lookup order (see module doc)."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise ClusterError(f"token file {path} does not exist")
        return path.read_text().strip() or None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser().read_text().strip() or None
    return None


def auth_headers(token_file: str | None = None) -> dict[str, str]:
    token = find_token(token_file)
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(address: str, token_file: str | None = None):
    """A ``JobSubmissionClient`` for ``http://HEAD:8265`` with the token header (if any)."""
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise ClusterError(f"--address must be the head's Jobs API, http://HEAD:8265 (got {address!r})")
    try:
        return JobSubmissionClient(address, headers=auth_headers(token_file))
    except Exception as exc:  # connection refused, 401/403 from the version probe
        raise ClusterError(f"cannot reach the Ray Jobs API at {address}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------- runtime env
def default_runtime_env_file() -> Path:
    """``cluster/runtime_env.yaml``, shipped in the package as ``otmel.cluster``."""
    import importlib.resources

    return Path(str(importlib.resources.files("otmel.cluster") / "runtime_env.yaml"))


def load_runtime_env(path: str | None = None, working_dir: str | None = None) -> dict:
    """The runtime env a submit ships: the YAML file (default: the project's), plus
    ``working_dir`` when the local tree is shipped (development)."""
    import yaml

    file = Path(path) if path else default_runtime_env_file()
    env = yaml.safe_load(file.read_text()) or {}
    if not isinstance(env, dict):
        raise ClusterError(f"{file}: a runtime env must be a mapping")
    if working_dir:
        env["working_dir"] = str(working_dir)
    elif "excludes" in env and "working_dir" not in env:
        env.pop("excludes")  # Ray ignores them without a working_dir; keep the spec minimal
    return env


# ---------------------------------------------------------------------------- jobs
def entrypoint(command: str, args: list[str]) -> str:
    if command not in JOB_COMMANDS:
        raise ClusterError(f"cannot submit {command!r}: one of {', '.join(JOB_COMMANDS)}")
    args = list(args[1:] if args and args[0] == "--" else args)
    return shlex.join(["otmel", command, *args])


def submit(address: str, command: str, args: list[str], runtime_env_file: str | None = None,
           working_dir: str | None = None, token_file: str | None = None, submission_id: str | None = None,
           out=sys.stdout) -> str:
    """Submit ``otmel COMMAND ARGS`` as a Ray job; prints and returns the job id."""
    client = job_client(address, token_file)
    env = load_runtime_env(runtime_env_file, working_dir)
    line = entrypoint(command, args)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(entrypoint=line, runtime_env=env, submission_id=submission_id,
                                       metadata={"otmel_command": command})
            break
        except Exception as exc:
            # the head's job agent registers a little after the dashboard, and a busy head can
            # miss the lookup: Ray answers 500 "No available agent ... try again later"
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise ClusterError(f"submit refused by {address}: {_one_line(exc)}") from None
    print(job_id, file=out, flush=True)
    return job_id


def error_line(logs: str, message: str | None) -> str:
    """The line that says why a job failed: the last exception line of its logs, else
    Ray's status message."""
    for line in reversed(logs.strip().splitlines()):
        s = line.strip()
        if s.startswith("otmel ") and ": error:" in s or (s and s.split(":")[0].endswith(("Error", "Exception"))):
            return s
    return (message or "no message").strip().splitlines()[-1]


def follow(client, job_id: str, out=sys.stdout, poll: float = 1.0, timeout: float | None = None) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    printed, deadline = 0, None if timeout is None else time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value if hasattr(client.get_job_status(job_id), "value")
                     else client.get_job_status(job_id))
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def wait_for(address: str, job_id: str, token_file: str | None = None, out=sys.stdout, err=sys.stderr) -> int:
    """``--wait``: stream the logs, then exit 0 if the job succeeded, else 1 with its error line."""
    client = job_client(address, token_file)
    status = follow(client, job_id, out)
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", file=err)
        return 0
    info = client.get_job_info(job_id)
    print(f"job {job_id} {status}: {error_line(client.get_job_logs(job_id), info.message)}", file=err)
    return 1


def list_jobs(address: str, token_file: str | None = None, out=sys.stdout) -> list:
    jobs = sorted(job_client(address, token_file).list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'JOB ID':<28} {'STATUS':<10} {'STARTED':<20} ENTRYPOINT", file=out)
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
        print(f"{j.submission_id or j.job_id:<28} {str(j.status.value):<10} {started:<20} {j.entrypoint}", file=out)
    return jobs


def job_status(address: str, job_id: str, token_file: str | None = None, out=sys.stdout) -> str:
    info = job_client(address, token_file).get_job_info(job_id)
    status = str(info.status.value)
    line = f"{job_id}: {status}"
    if info.start_time:
        end = info.end_time or time.time() * 1000
        line += f" ({(end - info.start_time) / 1000:.0f} s)"
    if info.message:
        line += f": {info.message.strip().splitlines()[-1]}"
    print(line, file=out)
    return status


def job_logs(address: str, job_id: str, follow_logs: bool = False, token_file: str | None = None,
             out=sys.stdout) -> None:
    client = job_client(address, token_file)
    if follow_logs:
        follow(client, job_id, out)
    else:
        out.write(client.get_job_logs(job_id))
        out.flush()


def stop_job(address: str, job_id: str, token_file: str | None = None, timeout: float = 60.0,
             out=sys.stdout) -> str:
    """Ask Ray to stop a job and wait (bounded) until it is in a terminal state."""
    client = job_client(address, token_file)
    client.stop_job(job_id)
    deadline = time.monotonic() + timeout
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            raise ClusterError(f"job {job_id} still {status} {timeout:.0f} s after stop")
        time.sleep(0.5)
    print(f"{job_id}: {status}", file=out)
    return status


# ---------------------------------------------------------------------------- scaling
def _use_token(token_file: str | None) -> None:
    """Token auth for this process's Ray client. Ray reads RAY_AUTH_MODE once, when its core
    library loads: call this before anything imports ray."""
    token = find_token(token_file)
    if token:
        if "ray._raylet" in sys.modules and os.environ.get("RAY_AUTH_MODE") != "token":
            raise ClusterError("internal: ray was imported before token auth was set up")
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = token


def _connect(address: str, token_file: str | None) -> None:
    if address.startswith(("http://", "https://")):
        raise ClusterError("otmel scale talks to the GCS: --address HEAD:6379 (not the dashboard URL)")
    _use_token(token_file)
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def describe_nodes(nodes: list[dict]) -> str:
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n.get("Resources", {}).items():
            if k in ("CPU", "GPU", "memory"):
                total[k] = total.get(k, 0) + v
    res = ", ".join(f"{k} {v / 2**30:.1f} GiB" if k == "memory" else f"{k} {v:g}" for k, v in sorted(total.items()))
    return f"{len(nodes)} node(s): {res}"


def scale_bundles(cpus: int | None, gpus: int | None, bundles: str | None) -> list[dict]:
    """The resource request as bundles: ``--cpus N`` = N one-CPU bundles, ``--gpus N`` = N
    one-GPU bundles (plus a CPU each: an encode actor needs a core beside its GPU)."""
    if bundles:
        try:
            parsed = json.loads(bundles)
        except json.JSONDecodeError as exc:
            raise ClusterError(f"--bundles must be a JSON list of resource dicts: {exc}") from None
        if not (isinstance(parsed, list) and all(isinstance(b, dict) and b for b in parsed)):
            raise ClusterError('--bundles must be a JSON list of resource dicts, e.g. [{"GPU": 1, "CPU": 8}]')
        return parsed
    out: list[dict] = []
    if cpus:
        out += [{"CPU": 1}] * int(cpus)
    if gpus:
        out += [{"GPU": 1, "CPU": 1}] * int(gpus)
    if not out:
        raise ClusterError("say what to request: --cpus N, --gpus N, --bundles JSON or --clear")
    return out


def _placement(bundles: list[dict], nodes: list[dict]) -> tuple[list[str], bool]:
    """First fit of ``bundles`` (largest first) on the alive nodes: the nodes used by the
    bundles that fit, and whether all did."""
    free = [(n["NodeID"], dict(n.get("Resources", {}))) for n in nodes]
    used: list[str] = []
    complete = True
    for b in sorted(bundles, key=lambda b: -sum(b.values())):
        for node_id, f in free:
            if all(f.get(k, 0) >= v for k, v in b.items()):
                for k, v in b.items():
                    f[k] -= v
                if node_id not in used:
                    used.append(node_id)
                break
        else:
            complete = False
    return used, complete


#: Ray namespace of the hold actors and internal-KV key of the request `otmel scale` made
HOLD_NAMESPACE = "otmel-scale"
REQUEST_KEY = b"otmel-scale/request"


class CapacityHold:
    """A detached actor that does nothing: a node with an actor on it is not idle, so the
    autoscaler does not remove it. Takes no CPU (jobs can use the whole node)."""

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def _request_slot() -> list[dict]:
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def _merge_request(add: list[dict], remove: list[dict]) -> list[dict]:
    """The cluster's request slot with ``remove`` taken out (one bundle per bundle, those
    still there) and ``add`` put in: other requesters' bundles stay."""
    from ray.autoscaler.sdk import request_resources

    current = _request_slot()
    for b in remove:
        if b in current:
            current.remove(b)
    merged = current + [dict(b) for b in add]
    request_resources(bundles=merged)
    return merged


def _release_holds() -> int:
    """Kill every hold actor; how many there were."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == HOLD_NAMESPACE]
    for name in names:
        ray.kill(ray.get_actor(name, namespace=HOLD_NAMESPACE), no_restart=True)
    return len(names)


def _hold(node_id: str):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(num_cpus=0)(CapacityHold).options(
        name=f"hold-{node_id}", namespace=HOLD_NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()


def scale(address: str, cpus: int | None = None, gpus: int | None = None, bundles: str | None = None,
          clear: bool = False, timeout: float = 300.0, token_file: str | None = None, out=sys.stdout) -> int:
    """Ask the autoscaler for capacity (or release it); print the nodes before and after.

    Ray keeps one resource request per cluster, a slot that every ``request_resources`` call
    overwrites (ray-project/ray#13534), and since Ray 2.5x Ray Data's ``AutoscalingCoordinator``
    (a detached actor that lives on once any Ray Data job has run) rewrites that slot every
    20 s with the requests of the jobs it knows. A request alone would therefore vanish within
    20 s and the autoscaler would remove the new nodes as idle. So the request only brings the
    nodes up (written merged into the slot, re-written while waiting if someone overwrote it);
    what keeps them is a hold: a detached zero-CPU actor on each node the request needs (a
    node with an actor is never idle; the actor takes no resources a job could use).
    ``--clear`` removes the holds and this command's bundles from the slot; the nodes leave
    after the cluster's idle timeout. A held node that dies is not replaced.
    """
    _connect(address, token_file)
    import ray
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    print(f"before: {describe_nodes(alive_nodes())}", file=out, flush=True)
    previous = json.loads(_internal_kv_get(REQUEST_KEY) or b"[]")
    if clear:
        released = _release_holds()
        _merge_request([], previous)
        _internal_kv_put(REQUEST_KEY, b"[]", overwrite=True)
        print(f"request cleared ({released} node hold(s) released): idle worker nodes leave after the cluster's "
              "idle timeout", file=out)
        print(f"now: {describe_nodes(alive_nodes())}", file=out)
        return 0
    wanted = scale_bundles(cpus, gpus, bundles)
    _release_holds()  # a new request replaces the last one
    written = _merge_request(wanted, previous)
    _internal_kv_put(REQUEST_KEY, json.dumps(wanted).encode(), overwrite=True)
    deadline = time.monotonic() + timeout
    held: dict[str, object] = {}
    while True:
        # hold each node as soon as the request needs it (a node idle past the idle timeout
        # before its hold is up would be removed once the request slot is overwritten)
        placed, complete = _placement(wanted, nodes := alive_nodes())
        for node_id in placed:
            if node_id not in held:
                held[node_id] = _hold(node_id)
        if complete:
            try:
                ray.get([held[n].node_id.remote() for n in placed], timeout=60)
                break
            except ray.exceptions.RayError:  # a node went before its hold was up: place again
                alive = {x["NodeID"] for x in alive_nodes()}
                held = {n: h for n, h in held.items() if n in alive}
        if time.monotonic() > deadline:
            print(f"after {timeout:.0f} s: {describe_nodes(nodes)}", file=out)
            raise ClusterError(f"the autoscaler did not provide {len(wanted)} bundle(s) within {timeout:.0f} s "
                               "(max_workers reached, no node type fits, or the provider is slow); the request stays "
                               "until `otmel scale --clear`")
        if _request_slot() != written:  # overwritten (Ray Data's coordinator): put ours back in
            written = _merge_request(wanted, [])
        time.sleep(1.0)
    for node_id in set(held) - set(placed):  # held on the way, not needed by the final placement
        ray.kill(held[node_id], no_restart=True)
    print(f"after: {describe_nodes(nodes)}; {len(placed)} node(s) held until `otmel scale --clear`", file=out)
    return 0


# ---------------------------------------------------------------------------- local cluster
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    """What ``otmel cluster local`` started (kept as state.json in its directory)."""

    directory: str
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    token_file: str
    nodes: int

    def save(self) -> None:
        Path(self.directory, "state.json").write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "LocalCluster":
        path = Path(directory, "state.json")
        if not path.is_file():
            raise ClusterError(f"no local cluster recorded in {directory}")
        return cls(**json.loads(path.read_text()))

    def env(self) -> dict[str, str]:
        """The environment of every process of the cluster (and of its clients)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_file}


def fake_cluster_config(nodes: int, max_nodes: int, cpus_per_node: int, gcs_address: str,
                        idle_timeout_minutes: float) -> dict:
    """A cluster-launcher config for Ray's ``fake_multinode`` provider: worker nodes are Ray
    nodes started as processes on this machine by the head's autoscaler."""
    return {
        "cluster_name": "otmel-local",
        "max_workers": max_nodes - 1,
        "idle_timeout_minutes": idle_timeout_minutes,
        "upscaling_speed": 10.0,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": cpus_per_node}, "node_config": {},
                                 "min_workers": 0, "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": cpus_per_node}, "node_config": {},
                               "min_workers": nodes - 1, "max_workers": max_nodes - 1},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def start_local_cluster(nodes: int = 3, autoscale: bool = False, max_nodes: int | None = None,
                        cpus_per_node: int = 2, directory: str | Path | None = None, timeout: float = 120.0,
                        idle_timeout_minutes: float = 0.1, out=sys.stdout) -> LocalCluster:
    """Head + ``nodes - 1`` worker nodes on this machine, token auth on. With ``autoscale``
    the worker count floats between ``nodes - 1`` and ``max_nodes - 1`` on resource requests
    (``otmel scale``) and idle time."""
    import secrets

    import yaml

    if nodes < 1:
        raise ClusterError("--nodes must be >= 1")
    max_nodes = max(nodes, max_nodes or (nodes + 2 if autoscale else nodes))
    directory = Path(directory or LOCAL_CLUSTER_DIR)
    if (directory / "state.json").is_file():
        raise ClusterError(f"a local cluster is already recorded in {directory}: `otmel cluster down` first")
    directory.mkdir(parents=True, exist_ok=True)
    token_file = directory / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    _use_token(str(token_file))
    from ray._private.services import get_node_ip_address

    port, dash = free_port(), free_port()
    ip = get_node_ip_address()  # what Ray's nodes register as (a GCS on 127.0.0.1 is not reachable by that name)
    gcs = f"{ip}:{port}"
    config = directory / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(nodes, max_nodes, cpus_per_node, gcs, idle_timeout_minutes)))
    temp_dir = Path("/tmp") / f"otmel-ray-{port}"  # short: Ray's socket paths must fit 107 bytes
    cluster = LocalCluster(str(directory), gcs, f"http://127.0.0.1:{dash}", str(temp_dir), str(token_file), nodes)
    env = {**os.environ, **cluster.env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           # jobs run `otmel ...` in a shell on the head: this installation's commands first
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    # every port the head would otherwise take at a fixed default gets a free one: a second Ray
    # on the machine (another local cluster, a user's `ray start`) holds 52365 and 10001, and a
    # head whose job agent cannot bind answers every submit with "No available agent"
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
           f"--num-cpus={cpus_per_node}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}",
           f"--autoscaling-config={config}", "--disable-usage-stats"]
    cluster.save()  # before start: `down` can clean up a half-started cluster
    # the cluster's processes get a session of their own, as a daemon's do: on Linux, where the
    # scheduler shares the CPU between sessions before the processes within one (autogroup),
    # they are one group beside the terminal's other work.
    # Left in the terminal's session beside CPU-bound processes there, the drivers of submitted
    # jobs (Ray starts each in a session of its own) got ~1% of a core: a 60-entity link job
    # took 240 s instead of 30 s (tests/README.md, "Under load")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, start_new_session=True)
    if proc.returncode != 0:
        stop_local_cluster(directory, out=open(os.devnull, "w"))
        raise ClusterError(f"ray start failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    try:
        _connect(gcs, str(token_file))
        deadline = time.monotonic() + timeout
        while len(alive_nodes()) < nodes:
            if time.monotonic() > deadline:
                raise ClusterError(f"only {len(alive_nodes())} of {nodes} nodes came up within {timeout:.0f} s")
            time.sleep(0.5)
        print(f"local cluster up: {describe_nodes(alive_nodes())}{' (autoscaling up to ' + str(max_nodes) + ' nodes)' if autoscale else ''}",
              file=out)
    finally:
        import ray

        ray.shutdown()
    print(f"  jobs:   otmel submit --address {cluster.dashboard_url} ...", file=out)
    print(f"  scale:  otmel scale --address {gcs} --cpus N", file=out)
    print(f"  token:  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_file}", file=out)
    print(f"  down:   otmel cluster down{'' if directory == LOCAL_CLUSTER_DIR else ' --dir ' + str(directory)}", file=out)
    return cluster


def _processes_under(temp_dir: str) -> dict[int, str]:
    """The processes whose command line names the cluster's temp dir (every Ray process of
    it does), as a whole path: ``/tmp/otmel-ray-6379`` is not in ``/tmp/otmel-ray-63790/...``,
    another local cluster's. PID -> command line."""
    names_it = re.compile(re.escape(temp_dir.rstrip("/")) + r"(?=/|\s|$)")
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if names_it.search(cmdline):
            found[int(proc.name)] = cmdline
    return found


#: a local cluster's processes are stopped in three waves, by their command lines: the
#: autoscaler (so that it starts no node while the rest go), then everything but the GCS
#: (raylets, agents, workers), then the GCS. Sent SIGTERM all at once, the GCS and the raylets
#: stayed up until the SIGKILL 20 s later (each waiting on the other); in waves each ends
#: within a second.
STOP_FIRST, STOP_LAST = "autoscaler/_private/monitor.py", "gcs_server"


def _stop_waves(processes: dict[int, str]) -> list[list[int]]:
    return [[p for p, c in processes.items() if STOP_FIRST in c],
            [p for p, c in processes.items() if STOP_FIRST not in c and STOP_LAST not in c],
            [p for p, c in processes.items() if STOP_LAST in c]]


def stop_local_cluster(directory: str | Path | None = None, timeout: float = 20.0, out=sys.stdout) -> int:
    """Stop every process of the local cluster recorded in ``directory`` (and nothing else:
    other Ray instances on the machine are left alone), in waves (:data:`STOP_FIRST`): SIGTERM and up
    to ``timeout`` seconds per wave, SIGKILL for what is left. Returns how many were stopped."""
    directory = Path(directory or LOCAL_CLUSTER_DIR)
    cluster = LocalCluster.load(directory)
    processes = _processes_under(cluster.temp_dir)

    def signal_and_wait(targets: list[int], sig, wait: float) -> list[int]:
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while (targets := [p for p in targets if not _ended(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        return targets

    left = [p for wave in _stop_waves(processes) for p in signal_and_wait(wave, signal.SIGTERM, timeout)]
    signal_and_wait(left, signal.SIGKILL, 5.0)
    (directory / "state.json").unlink(missing_ok=True)
    print(f"local cluster at {cluster.gcs_address} stopped", file=out)
    return len(processes)


def _ended(pid: int) -> bool:
    """The process is gone, or a zombie (dead, not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True
