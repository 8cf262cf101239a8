"""What the command groups share: printing, and the options of the Ray Data jobs (index, link)."""

from __future__ import annotations

import argparse
import math
import os
import sys


class OneLineErrors(argparse.ArgumentParser):
    """argparse with its usage errors in one line, ``otmel COMMAND: error: ...`` (exit 2), like
    every other error a user can fix; ``--help`` still shows the usage."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def location(text: str) -> str:
    """An ``argparse`` type for a path argument: a local path made absolute against the
    directory the command was typed in, here, before any config is built or sent to Ray (a
    Ray worker's working directory is not the user's: ``otmel train --data data`` failed in
    the workers); ``s3://`` and other URIs as given. Under ``otmel submit`` the job's own
    command line is parsed on the cluster, against the job's working directory."""
    if "://" in text or not text:
        return text
    return os.path.abspath(os.path.expanduser(text))


location.__name__ = "path"


def model_location(text: str) -> str:
    """``--clip``: a hub name (``openai/clip-vit-base-patch32``) as given, a local directory
    made absolute (:func:`location`) when it exists."""
    return location(text) if os.path.exists(os.path.expanduser(text)) else text


model_location.__name__ = "name or path"


def integer(minimum: int | None = None, maximum: int | None = None):
    """An ``argparse`` type: an integer within [minimum, maximum], checked while parsing (before
    any work: Ray is not started, nothing is deleted)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be {_bounds(minimum, None, maximum)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def real(minimum: float | None = None, above: float | None = None, maximum: float | None = None):
    """An ``argparse`` type: a FINITE number (``nan`` and ``inf`` refused) >= minimum, > above,
    <= maximum."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or minimum is not None and value < minimum or \
                above is not None and value <= above or maximum is not None and value > maximum:
            bounds = _bounds(minimum, above, maximum)
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' + bounds if bounds else ''}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _bounds(minimum, above, maximum) -> str:
    parts = ([f">= {minimum:g}"] if minimum is not None else []) + ([f"> {above:g}"] if above is not None else []) \
        + ([f"<= {maximum:g}"] if maximum is not None else [])
    return " and ".join(parts)


def say(msg: str) -> None:
    """A result line on stdout (logs go to stderr)."""
    print(msg, flush=True)


def data_job_options(s: argparse.ArgumentParser) -> None:
    """Options the Ray Data jobs (index, link) share: actors, images, cluster, storage."""
    s.add_argument("--workers", default="auto", metavar="auto|N|MIN-MAX",
                   help="encode actors: N, or MIN-MAX for a pool Ray Data scales with the queue (one GPU each "
                        "on a GPU cluster); auto (default): one per GPU of the cluster, or on CPU one "
                        "single-thread actor per CPU of its nodes")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--gpu", dest="gpu", action="store_const", const=True, default=None,
                   help="a GPU per encode actor even if no GPU node is up yet (the autoscaler adds them)")
    g.add_argument("--cpu", dest="gpu", action="store_const", const=False, help="encode on CPUs even on a GPU cluster")
    s.add_argument("--cpus-per-actor", type=real(above=0), default=0.25, metavar="C",
                   help="CPUs of each CPU encode actor; its intra-op threads: C if >= 1, else the node's CPUs over "
                        "the pool's maximum size (the default 0.25 leaves room for the read tasks on small machines)")
    s.add_argument("--batch-size", type=integer(1), default=64)
    s.add_argument("--image-transform", choices=["auto", "cpu", "device"], default="auto",
                   help="where images are resized and normalised: in the CPU preprocess tasks, or on the encode "
                        "actors' device (their GPU: the CPUs then only decode); auto: device when they have a GPU")
    s.add_argument("--allow-image-prefix", action="append", metavar="DIR", help="local image_uri roots allowed (repeatable)")
    s.add_argument("--allow-private-hosts", action="store_true", help="allow http(s) image_uri on private/loopback hosts")
    s.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    s.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
