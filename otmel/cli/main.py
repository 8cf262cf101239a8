"""The ``otmel`` command line.

    otmel synth --entities N --mentions M --out DIR
    otmel import-mimic --root DIR --dataset wikimel|richpediamel|wikidiverse --out DIR2
    otmel train --data DATA_URI --out RUN_URI --mode ot|att|kd --workers N [--gpu] [--epochs E]
                [--batch-size B] [--lr LR] [--lr-schedule constant|cosine] [--grad-clip NORM]
                [--clip NAME_OR_DIR | --tiny-clip] [--resume] [--address ADDR]
    otmel evaluate --checkpoint CKPT_URI --data DATA_URI --split test [--retrieve K] [--out metrics.json]
    otmel index --model MODEL_URI --kb KB_URI --out INDEX_URI --shards S [--factory FAISS_FACTORY]
    otmel index --update INDEX_URI --kb CHANGED_KB_URI --model MODEL_URI
    otmel link --model MODEL_URI --index INDEX_URI --input INPUT_URI --output OUTPUT_URI [--top-k k]
               [--candidates K] [--nil-threshold T] [--workers auto|N|MIN-MAX] [--link-actors N|MIN-MAX]
               [--shard-replicas R] [--detect-mentions alias]
    otmel calibrate --model MODEL_URI --index INDEX_URI --data DATA_URI [--split dev]
    otmel demo [--out DIR]

  on a cluster (Ray Jobs API / autoscaler; see README "Run on a cluster"):
    otmel submit --address http://HEAD:8265 [--wait] train|index|link|evaluate|export|calibrate -- ARGS...
    otmel jobs|status JOB_ID|logs JOB_ID [--follow]|stop JOB_ID --address http://HEAD:8265
    otmel scale --address HEAD:6379 (--cpus N | --gpus N | --bundles JSON | --clear) [--timeout S]
    otmel cluster local --nodes N [--autoscale] | otmel cluster down

Errors a user can fix (bad paths, schemas, checkpoints) print one line and exit 2. SIGINT and
SIGTERM stop a job cleanly: one line saying what was kept, exit 130 / 143 (a second signal
exits at once).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from otmel.cli import cluster, data, demo, export, index, kge, link, train
from otmel.cli.common import OneLineErrors

#: the command groups, in the order of ``otmel --help``
GROUPS = (data, train, export, kge, index, link, demo, cluster)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "filelock", "urllib3", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(prog="otmel", description="Multimodal entity linking with OT-MEL at cluster scale.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return p


#: errors a user can act on: one line, exit code 2 (anything else is a bug: full traceback)
def _user_errors() -> tuple[type[BaseException], ...]:
    from otmel.cluster.ops import ClusterError
    from otmel.jobs.common import PipelineStalled
    from otmel.io.storage import StorageError

    return (FileNotFoundError, FileExistsError, ValueError, PermissionError, StorageError, ClusterError,
            PipelineStalled)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM (Ctrl-C; Kubernetes, ``ray job stop``, ``otmel stop``) raise
    :class:`otmel.jobs.common.JobInterrupted` in the command's main thread: the job stops
    submitting work, ends its actors, and the CLI prints one line of what was kept. A second
    signal while it does so exits at once (130 / 143), as an impatient operator expects.
    (Ray's start replaces these handlers; the jobs put them back: keep_signal_handlers.) The
    caller's handlers are back afterwards (``main`` called in-process, as the tests do)."""
    from otmel.jobs.common import JobInterrupted

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = []

    def on_signal(signum, _frame):
        if seen:
            os._exit(128 + signum)
        seen.append(signum)
        raise JobInterrupted(signum)

    before = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    from otmel.jobs.common import JobInterrupted

    try:  # a usage error (one line) or --help: nothing started, nothing touched
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    _setup_logging(args.verbose)
    try:
        with stop_on_signals():
            return args.func(args)
    except JobInterrupted as exc:
        print(f"otmel {args.command}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except _user_errors() as exc:
        if args.verbose:
            raise
        print(f"otmel {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
