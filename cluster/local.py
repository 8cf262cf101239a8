"""`otmel cluster local | down`: a multi-node Ray cluster on this machine (head + worker nodes
started by Ray's autoscaler with the fake multi-node provider, token auth on) to try the cluster
operations of :mod:`otmel.cluster.ops` on, and its ordered shutdown (this cluster's processes
only: `ray stop` would end every Ray on the machine)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from otmel.cluster.ops import ClusterError, _connect, _use_token, alive_nodes, describe_nodes

#: where ``otmel cluster local`` keeps its state unless ``--dir`` says otherwise
LOCAL_CLUSTER_DIR = Path(os.environ.get("OTMEL_LOCAL_CLUSTER_DIR", Path.home() / ".otmel" / "local-cluster"))


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
