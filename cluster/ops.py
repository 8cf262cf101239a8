"""Cluster operations on Ray's own machinery: submit otmel commands as Ray jobs (Jobs API),
watch and stop them, ask the autoscaler for capacity and hold it (:func:`scale`). The local
multi-node cluster to try all of it on is ``otmel.cluster.local``.

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
import shlex
import sys
import time
from pathlib import Path

#: the otmel commands that run as cluster jobs
JOB_COMMANDS = ("train", "index", "link", "evaluate", "export", "calibrate")
#: terminal Ray job states
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: how long a submit retries while the head's job agent is not available yet
AGENT_WAIT_S = 60.0


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
