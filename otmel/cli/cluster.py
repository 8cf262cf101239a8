"""`otmel submit | jobs | status | logs | stop | scale | cluster`: cluster operations
(otmel.cluster.ops) through the Ray Jobs API and the autoscaler."""

from __future__ import annotations

import argparse

from otmel.cli.common import integer, location, real


def cmd_submit(args) -> int:
    from otmel.cluster import ops

    job_id = ops.submit(args.address, args.job_command, args.job_args, args.runtime_env, args.working_dir,
                        args.token_file, args.submission_id)
    return ops.wait_for(args.address, job_id, args.token_file) if args.wait else 0


def cmd_jobs(args) -> int:
    from otmel.cluster import ops

    ops.list_jobs(args.address, args.token_file)
    return 0


def cmd_status(args) -> int:
    from otmel.cluster import ops

    status = ops.job_status(args.address, args.job_id, args.token_file)
    return 1 if status in ("FAILED", "STOPPED") else 0


def cmd_logs(args) -> int:
    from otmel.cluster import ops

    ops.job_logs(args.address, args.job_id, args.follow, args.token_file)
    return 0


def cmd_stop(args) -> int:
    from otmel.cluster import ops

    ops.stop_job(args.address, args.job_id, args.token_file, args.timeout)
    return 0


def cmd_scale(args) -> int:
    from otmel.cluster import ops

    return ops.scale(args.address, args.cpus, args.gpus, args.bundles, args.clear, args.timeout, args.token_file)


def cmd_cluster(args) -> int:
    from otmel.cluster import local

    if args.action == "local":
        local.start_local_cluster(args.nodes, args.autoscale, args.max_nodes, args.cpus_per_node, args.dir)
    else:
        local.stop_local_cluster(args.dir)
    return 0


def add_parsers(sub) -> None:
    from otmel.cluster.ops import JOB_COMMANDS

    def common(s, address_help="the head's Jobs API, http://HEAD:8265"):
        s.add_argument("--address", required=True, help=address_help)
        s.add_argument("--token-file", type=location, default=None,
                       help="cluster token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")

    s = sub.add_parser("submit", help="run an otmel command on a cluster as a Ray job (prints the job id)")
    common(s)
    s.add_argument("--wait", action="store_true", help="stream the logs; exit with the job's status")
    s.add_argument("--runtime-env", default=None, help="runtime env YAML (default: the packaged cluster/runtime_env.yaml)")
    s.add_argument("--working-dir", default=None, help="ship this local directory (development; excludes apply)")
    s.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    s.add_argument("job_command", choices=JOB_COMMANDS)
    s.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then the command's own arguments")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("jobs", help="list the cluster's jobs")
    common(s)
    s.set_defaults(func=cmd_jobs)
    for name, func, text in (("status", cmd_status, "a job's status (exit 1 if it failed or was stopped)"),
                             ("logs", cmd_logs, "a job's logs"), ("stop", cmd_stop, "stop a job")):
        s = sub.add_parser(name, help=text)
        s.add_argument("job_id")
        common(s)
        if name == "logs":
            s.add_argument("--follow", action="store_true", help="stream until the job ends")
        if name == "stop":
            s.add_argument("--timeout", type=real(above=0), default=60.0, help="seconds to wait for the job to stop")
        s.set_defaults(func=func)

    s = sub.add_parser("scale", help="ask the autoscaler for capacity (request_resources) or release it")
    common(s, "the cluster's GCS address, HEAD:6379")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--cpus", type=integer(1), help="at least N CPUs in the cluster (N one-CPU bundles)")
    g.add_argument("--gpus", type=integer(1), help="at least N GPUs (N bundles of 1 GPU + 1 CPU)")
    g.add_argument("--bundles", help='JSON list of resource bundles, e.g. \'[{"GPU": 1, "CPU": 8}]\'')
    g.add_argument("--clear", action="store_true", help="drop the request: idle nodes leave after the idle timeout")
    s.add_argument("--timeout", type=real(above=0), default=600.0, help="seconds to wait for the capacity")
    s.set_defaults(func=cmd_scale)

    s = sub.add_parser("cluster", help="a local multi-node Ray cluster on this machine (token auth on)")
    s.add_argument("action", choices=["local", "down"])
    s.add_argument("--nodes", type=integer(1), default=3, help="nodes including the head (local)")
    s.add_argument("--autoscale", action="store_true", help="let `otmel scale` add nodes up to --max-nodes")
    s.add_argument("--max-nodes", type=integer(1), default=None, help="default: --nodes + 2 with --autoscale")
    s.add_argument("--cpus-per-node", type=integer(1), default=2,
                   help="logical CPUs of each node (Ray Data lists input files in 1-CPU tasks: keep >= 2)")
    s.add_argument("--dir", type=location, default=None, help="state directory (default ~/.otmel/local-cluster)")
    s.set_defaults(func=cmd_cluster)
