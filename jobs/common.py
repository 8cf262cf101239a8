"""Pieces the Ray Data jobs share: Ray start-up, the preprocess step and the encode actor.

Batch callables follow the Ray Data convention: ``dict[str, np.ndarray] -> dict[str, np.ndarray]``,
loaded once (``__init__``), wired with ``map_batches``. Rows are never dropped here: a row that
cannot be encoded keeps ``ok = False`` and its reason in ``error``; the job decides what that
means (the index skips and counts it, the link job writes an ``error`` row).
"""

from __future__ import annotations

import logging
import os
import re
import warnings

import numpy as np

from otmel.linking.image_fetch import fetch_images
from otmel.model.preprocessing import MODEL_INPUTS  # the encoder inputs the preprocess step produces

log = logging.getLogger(__name__)


class JobInterrupted(BaseException):
    """SIGINT or SIGTERM reached a job's driver (the CLI turns both into this exception, see
    :func:`otmel.cli.main.stop_on_signals`): the job stops submitting work, ends its actors
    and reports what it kept. A BaseException, like KeyboardInterrupt: no ``except Exception``
    on the way may swallow it."""

    def __init__(self, signum: int, message: str | None = None, kept: int | None = None):
        import signal

        self.signum = signum
        self.kept = kept  # input files whose output was committed and kept (None: not counted)
        self.signal_name = signal.Signals(signum).name
        super().__init__(message or f"interrupted by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum


def keep_signal_handlers(start):
    """Call ``start()`` (``ray.init``) and put back the Python SIGINT/SIGTERM handlers that were
    there before: Ray's C++ core installs its own on start, and a SIGTERM (Kubernetes, ``ray
    job stop``) then ended the driver with SIGABRT and a C++ stack dump (exit 134)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return start()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return start()
    finally:
        for s, handler in before.items():
            if handler is not None:
                signal.signal(s, handler)


class PipelineStalled(RuntimeError):
    """A job's pipeline made no progress for its stall timeout in every attempt: one line
    naming what was kept and what to do (the CLI prints it and exits 2)."""


#: AWS variables that are secrets: never sent in a runtime_env (Ray keeps a job's runtime_env
#: in its job table, shown by the dashboard and ``ray list jobs --detail``)
AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def worker_env() -> dict[str, str]:
    """Environment Ray workers get from the driver: otmel's knobs and the non-secret AWS
    settings (region, endpoint, profile name). Credentials are not sent: the workers of a
    local instance inherit the driver's environment, and a cluster's nodes have their own
    credential chain (instance role / IRSA, or the environment ``ray start`` ran in)."""
    return {k: v for k, v in os.environ.items()
            if (k.startswith("AWS_") and k not in AWS_SECRETS) or k.startswith("OTMEL_")}


#: set by Ray's job supervisor in the environment of a submitted job's driver (`otmel submit`)
JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_address(address: str | None) -> str:
    """Where a job runs: ``--address`` if given (``auto``: the cluster running on this machine,
    or RAY_ADDRESS's); else, in the driver of a submitted Ray job, that job's cluster (its
    supervisor sets ``RAY_ADDRESS`` and :data:`JOB_DRIVER_ENV`); else a NEW local instance.
    A ``RAY_ADDRESS`` exported in a user's shell is not followed without ``--address``: the
    embedded default must not join (and die with) whatever other cluster runs on the machine.
    Never ``None``: ``ray.init()`` would silently join a cluster a ``ray start`` left running.
    """
    if address:
        return address
    if os.environ.get("RAY_ADDRESS") and os.environ.get(JOB_DRIVER_ENV):
        return os.environ["RAY_ADDRESS"]
    return "local"


#: ``--workers auto``: the encode pool sized from the cluster at the job's start (encode_pool)
AUTO_POOL = "auto"

#: Ray memory an encode actor is counted for when ``auto`` sizes a CPU pool: at ViT-B/32 size an
#: actor peaks at ~1.2 GB of private RSS (bench/results/pipeline.md), so a node with many cores
#: and little memory gets fewer actors than cores
ENCODE_ACTOR_MEMORY = int(1.5 * 1024**3)


def parse_pool(spec: int | str, what: str = "--workers", allow_auto: bool = False) -> tuple[int, int]:
    """An actor pool size: ``N`` or ``MIN-MAX`` (Ray Data autoscales between them; ``N``
    runs as ``1-N`` starting at N, see :func:`actor_pool`);
    with ``allow_auto``, ``auto`` too (checked here, sized by :func:`encode_pool`)."""
    text = str(spec).strip()
    if allow_auto and text == AUTO_POOL:
        return 1, 1
    try:
        lo, _, hi = text.partition("-")
        low, high = int(lo), int(hi) if hi else int(lo)
    except ValueError:
        raise ValueError(f"{what} must be {'auto, ' if allow_auto else ''}N or MIN-MAX (e.g. 4 or 2-16), "
                         f"got {spec!r}") from None
    if low < 1 or high < low:
        raise ValueError(f"{what} must be N >= 1 or MIN-MAX with 1 <= MIN <= MAX, got {spec!r}")
    return low, high


def encode_pool(spec: int | str, use_gpu: bool) -> str:
    """The encode actor pool a job runs: ``spec`` (``--workers``) as given, or for ``auto``
    (the default) one actor per GPU of the cluster on a GPU cluster, and on CPU one
    single-thread actor per CPU of the cluster's nodes (at most one per
    :data:`ENCODE_ACTOR_MEMORY` of Ray memory).

    Why one thread per actor on CPU: the encoder is ~83% of a link's CPU time at real model
    size, and on a node whose cores it shares with the read, preprocess, link and shard work,
    a multi-threaded ONNX Runtime session stalls at every operator whenever one of its
    threads is preempted, where independent single-thread actors lose only the preempted
    one's time (bench/results/pipeline.md, ViT-B/32 size on 2 cores: 0.90 of the encode-only
    pipeline after start-up either way in the latest run, 1.00 vs 0.92 in an earlier one
    with the machine under other load). The sizes are read once, at the job's start: on an
    autoscaling cluster give ``MIN-MAX``."""
    if str(spec).strip() != AUTO_POOL:
        parse_pool(spec)
        return str(spec).strip()
    import ray

    resources = ray.cluster_resources()
    if use_gpu:
        return str(max(1, int(resources.get("GPU", 0))))
    cpus = sum(int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive"))
    by_memory = int(resources.get("memory", 0)) // ENCODE_ACTOR_MEMORY
    return str(max(1, min(cpus, by_memory)))


def actor_pool(spec: int | str, what: str = "--workers"):
    """The Ray Data compute strategy of a pool spec (see :func:`parse_pool`).

    ``N`` starts N actors but may go down to one: a pool Ray Data may not shrink deadlocks
    when its cluster does. After a node is lost its actors are restarted elsewhere
    (``max_restarts``); where the remaining nodes cannot hold them all, the ones that did
    restart took the CPUs the read and preprocess tasks need, nothing feeds the actors, and
    the job waits forever (seen on a 3-node cluster losing 2 nodes: 4 encode actors x 0.25,
    4 shard actors x 0.25 and 2 link actors x 0.1 CPU on the last 2 CPUs). Ray Data scales
    such a pool down to its budget instead, and back up when nodes return. The price: Ray
    Data's autoscaler treats the pool as ``1-N``, so it also retires an actor while at most
    half of them have a batch (a starved pool) and starts one again, loading the model anew,
    once batches queue at 1.75 per actor (Ray 2.60's defaults)."""
    import ray.data

    low, high = parse_pool(spec, what)
    if low == high:
        return ray.data.ActorPoolStrategy(min_size=1, max_size=high, initial_size=high)
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high)


#: Ray Data's target block size in otmel's jobs: blocks of a few batches instead of Ray
#: Data's 128 MiB default. A worker holds a few blocks at a time (its input, its output
#: buffer), so with the default a read task, the preprocess step and the encode actor
#: grew with the input file up to several hundred MB each (measured: +350 MB for the
#: encode actor between 5k and 20k text rows); with this, their memory is set by the batch
#: size, not the input (tests/test_driver_memory.py).
TARGET_BLOCK_BYTES = 8 * 1024 * 1024


def connect_ray(address: str | None, **init_kwargs) -> None:
    """``ray.init`` for a job (see :func:`ray_address`); logs at start whether the job
    started its own local instance or joined a cluster."""
    import ray

    where = ray_address(address)
    if where == "local" and os.environ.get("RAY_ADDRESS"):
        # the local instance's processes inherit this environment: none of them may follow it
        log.info("RAY_ADDRESS=%s ignored (no --address): pass --address auto to join that cluster",
                 os.environ.pop("RAY_ADDRESS"))
    keep_signal_handlers(lambda: ray.init(address=where, **init_kwargs))
    cpus = ray.cluster_resources().get("CPU", 0)
    if where == "local":
        log.info("started a local Ray instance (%g CPUs; the embedded default: --address auto or HOST:PORT "
                 "joins a cluster)", cpus)
    else:
        log.info("joined the Ray cluster at %s (%d node(s), %g CPUs)", ray.get_runtime_context().gcs_address,
                 len([n for n in ray.nodes() if n.get("Alive")]), cpus)


def init_ray(address: str | None, log_to_driver: bool = True) -> None:
    """Join ``address`` (a cluster) or start a local instance, unless Ray is already up
    (see :func:`ray_address`).

    ``log_to_driver=False`` keeps workers' logs in the session logs (the demo: Ray Train's
    per-worker chatter); the driver's progress bars stay.
    """
    import ray

    if not ray.is_initialized():
        connect_ray(address, runtime_env={"env_vars": worker_env()}, log_to_driver=log_to_driver)
    ctx = __import__("ray.data", fromlist=["DataContext"]).DataContext.get_current()
    # blocks may finish in any order: the jobs' outputs do not depend on it (link parts are
    # re-sorted at commit, index shards sorted by entity id), and in-order delivery would make
    # every stage wait for the slowest block
    ctx.execution_options.preserve_order = False
    ctx.target_max_block_size = TARGET_BLOCK_BYTES
    ctx.enable_progress_bars = True


#: how long :func:`end_actors` waits for the actors to remove their scratch dirs (~1 s per GB)
END_ACTORS_TIMEOUT_S = 30.0


def _remove_scratch_dirs(_actor) -> int:
    from otmel.io.storage import remove_scratch_dirs

    return remove_scratch_dirs()


def end_actors(actors: list, timeout: float = END_ACTORS_TIMEOUT_S) -> None:
    """End a job's own actors (shard servers and builders, the commit coordinator) without
    leaving their files behind: each first removes its scratch dirs (its local copies of shards
    and models, :func:`otmel.io.storage.scratch_dir`), then ``ray.kill``, which skips atexit. Not
    a graceful exit (``__ray_terminate__``), which removes them through atexit too but costs
    each process its interpreter's teardown: +1 CPU-s and +0.8 s per small link job (measured,
    4 jobs alternating). An actor that does not answer within ``timeout`` (hung) is killed
    all the same; the calls are not retried (a dead actor's call ends in an error, not a wait)."""
    import ray

    refs = [actor.__ray_call__.options(max_task_retries=0).remote(_remove_scratch_dirs) for actor in actors]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for actor in actors:
        ray.kill(actor, no_restart=True)


def gpu_count() -> int:
    """GPUs of the Ray cluster (the driver may have none while the workers do)."""
    import ray

    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count()


def image_transform(requested: str, use_gpu: bool) -> str:
    """Where a job resizes and normalises images: ``--image-transform cpu|device``, or ``auto``:
    on the encoder's GPU when the encode actors get one (the CPU then only decodes: ~3x the
    rows per preprocessing core, bench/results/preprocess.md), else in the CPU tasks (on a CPU
    node the encoder is the bottleneck: the work stays off its cores)."""
    from otmel.model.preprocessing import IMAGE_TRANSFORMS

    if requested == "auto":
        return "device" if use_gpu else "cpu"
    if requested not in IMAGE_TRANSFORMS:
        raise ValueError(f"--image-transform must be auto, cpu or device, got {requested!r}")
    return requested


#: the column of decoded uint8 images the preprocess step sends with ``image_transform = device``
IMAGE_PIXELS = "image_pixels"


class Preprocess:
    """Tokenise + decode (and, on the CPU path, resize/normalise) images (CPU tasks). ``kind``
    = ``entity`` or ``mention``.

    ``bad_image``: ``error`` (a given image that cannot be fetched or decoded makes the row an
    error, the default for linking: the user asked for multimodal linking) or ``text``
    (link/index on text alone and count it). ``transform``: ``cpu`` (``pixel_values`` out) or
    ``device`` (the decoded uint8 images out, as :data:`IMAGE_PIXELS`; the encode actor
    resizes and normalises them).
    """

    def __init__(self, preprocessor, kind: str, image_policy=None, bad_image: str = "error", transform: str = "cpu"):
        from otmel.linking.image_fetch import ImagePolicy

        if kind not in ("entity", "mention"):
            raise ValueError(f"kind must be entity or mention, got {kind!r}")
        if bad_image not in ("error", "text"):
            raise ValueError(f"bad_image must be error or text, got {bad_image!r}")
        self.pre = preprocessor
        self.kind = kind
        self.policy = image_policy or ImagePolicy()
        self.bad_image = bad_image
        self.transform = transform

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(batch.values())))
        col = lambda name: list(batch[name]) if name in batch else [None] * n  # noqa: E731
        images, fetch_errors = fetch_images(col("image"), col("image_uri"), self.policy)
        if self.kind == "entity":
            rows = {"name": col("name"), "attributes": col("attributes"), "image": images}
            prepared = self.pre.entities(rows, self.transform)
        else:
            rows = {"mention": col("mention"), "text": col("text"), "image": images}
            prepared = self.pre.mentions(rows, self.transform)
        errors = list(prepared.errors)
        for i in range(n):
            image_problem = fetch_errors[i] or next((w for w in prepared.warnings[i] if w.startswith("bad_image")), None)
            if errors[i] is None and image_problem and self.bad_image == "error":
                errors[i] = image_problem
            upstream = batch.get("error")
            if upstream is not None and isinstance(upstream[i], str) and upstream[i]:  # found earlier (reading the input)
                errors[i] = upstream[i]
        out = {k: v for k, v in batch.items() if k not in ("image", "image_uri", "error", "ok")}
        out.update({
            "input_ids": prepared.input_ids,
            "attention_mask": prepared.attention_mask,
            "has_image": prepared.has_image,
            "ok": np.array([e is None for e in errors], dtype=bool),
            # "" for no error (``ok`` says which rows are usable): a column of nulls passed on
            # from NumPy came back as float NaN in some blocks, and Ray Data could not batch
            # them with blocks holding an error (string vs float)
            "error": np.array([e if isinstance(e, str) else "" for e in errors], dtype=object),
        })
        if self.transform == "cpu":
            out["pixel_values"] = prepared.pixel_values
        else:  # variable shapes: one uint8 array per row (Ray Data keeps it as a ragged tensor column)
            column = np.empty(n, dtype=object)
            column[:] = prepared.image_pixels
            out[IMAGE_PIXELS] = column
        return out


def encode_threads(cpus: float, pool_size: int, node_cpus: int) -> int:
    """Intra-op threads of a CPU encode actor: the CPUs it was given (``--cpus-per-actor``),
    whole. A fractional share (the default 0.25, which leaves Ray room for the read and
    preprocess tasks on small machines) stands for "the node's cores, shared by the pool":
    ``node_cpus // pool_size`` threads, at least 1 (the default ``auto`` pool on CPU has one
    actor per CPU, so 1 thread each). The encoder is nearly all of a link's time at real
    model size (bench/results), so the pool must keep every core busy; the light tasks
    beside it take their turns from the OS."""
    if cpus >= 1:
        return int(cpus)
    return max(1, int(node_cpus) // max(1, int(pool_size)))


def node_cpus() -> int:
    """CPUs Ray registered for the node this process runs on (the process's cores outside Ray)."""
    import ray

    if not ray.is_initialized():
        return max(1, len(os.sched_getaffinity(0)))
    here = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n.get("NodeID") == here:
            return max(1, int(n.get("Resources", {}).get("CPU", 1)))
    return 1


class Encode:
    """Encoder actor: loads the model once (ONNX Runtime or PyTorch), encodes the usable rows.

    Rows with ``ok = False`` are not encoded (their feature rows are zeros); the model inputs
    are dropped from the output, ``feature_names`` added.
    """

    def __init__(self, model_uri: str, feature_names: tuple[str, ...], s3_endpoint: str | None = None,
                 cpus: float | None = None, pool_size: int = 1, transform: str = "cpu"):
        from otmel.backend import load_backend

        # on CPU (``cpus`` given) the threads follow the CPUs the actor was given; on GPU the runtime's
        threads = None if cpus is None else encode_threads(cpus, pool_size, node_cpus())
        self.threads = threads
        self.backend = load_backend(model_uri, s3_endpoint, threads=threads)
        # torch only where it computes: a checkpoint's encoder, the device image transform (an
        # ONNX encoder with CPU-side images never imports it: ~2 s of a fresh worker's start)
        if threads and (self.backend.kind == "torch" or transform == "device"):
            import torch

            torch.set_num_threads(threads)
        self.feature_names = tuple(feature_names)
        self.pixels = None
        if transform == "device":  # resize + normalise here, on the actor's GPU (its CPU without one)
            import torch

            from otmel.model.pixels import PixelTransform

            device = "cuda" if cpus is None and torch.cuda.is_available() else "cpu"
            self.pixels = PixelTransform(self.backend.preprocessor.image_steps, device)

    def _inputs(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """The encoder inputs of ``rows``; with the device transform, their pixels made here."""
        inputs = {k: np.asarray(batch[k])[rows] for k in MODEL_INPUTS if k != "pixel_values" or self.pixels is None}
        if self.pixels is not None:
            inputs["pixel_values"] = self.pixels([batch[IMAGE_PIXELS][i] for i in rows])
        return inputs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], dtype=bool)
        n = len(ok)
        out = {k: v for k, v in batch.items() if k not in MODEL_INPUTS and k != IMAGE_PIXELS}
        sel = np.flatnonzero(ok)
        feats = self.backend.encode(self._inputs(batch, sel), self.feature_names) if len(sel) else None
        if feats is None:  # nothing usable in this batch: shapes from a one-row encode
            probe = self.backend.encode(self._inputs(batch, np.arange(1)), self.feature_names)
            feats = {k: v[:0] for k, v in probe.items()}
        for name, arr in feats.items():
            full = np.zeros((n, *arr.shape[1:]), dtype=arr.dtype)
            full[sel] = arr
            out[name] = full
        return out


def encode_step(ds, cfg, feature_names: tuple[str, ...], use_gpu: bool, transform: str = "cpu",
                pool: str | None = None):
    """The encode actor pool of a job (``cfg``: an index or link config) on dataset ``ds``:
    ``pool`` actors (``--workers`` sized by :func:`encode_pool` when not given) of
    ``--cpus-per-actor`` CPUs, or one GPU each on a GPU cluster; ``transform = device``: they
    resize and normalise the images too."""
    pool = pool or encode_pool(cfg.workers, use_gpu)
    log.info("encode pool: %s actor(s) (--workers %s), %s each", pool, cfg.workers,
             "a GPU" if use_gpu else f"{cfg.cpus_per_actor:g} CPU")
    # max_restarts: Ray Data's default for actors (a killed encode actor comes back), given
    # explicitly because remote args that differ from the preprocess tasks' are what keeps
    # Ray Data from fusing preprocessing into the actors (it fuses a task step into the next
    # actor step when their remote args are equal, e.g. --cpus-per-actor 0.25 = its CPUs):
    # the encoder's cores would then decode images between batches. Ray 2.60 has no named
    # parameter for it and warns that such remote args are deprecated (removed in 2.64, above
    # the pinned 2.60.*): that one warning, for this call only, would be noise in every job's log
    warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", category=DeprecationWarning,
                            module=re.escape(__name__))
    return ds.map_batches(Encode, batch_size=cfg.batch_size, compute=actor_pool(pool),
                          num_cpus=cfg.cpus_per_actor, num_gpus=1 if use_gpu else 0, max_restarts=-1,
                          fn_constructor_kwargs={"model_uri": cfg.model, "feature_names": feature_names,
                                                 "s3_endpoint": cfg.s3_endpoint,
                                                 "cpus": None if use_gpu else cfg.cpus_per_actor,
                                                 "pool_size": parse_pool(pool)[1], "transform": transform})


def driver_model(uri: str, s3_endpoint: str | None = None):
    """(backend, per-row feature shapes) for a job's driver, which tokenises, checks versions
    and shapes but never encodes: an ONNX export is opened without its encoder (and, from
    S3, encoder.onnx is not downloaded) when export.json records the shapes. At ViT-B/32
    size that is ~10 s and ~1 GB of driver RSS less per job (the encode actors load it);
    a checkpoint, or an export that does not record them, is loaded whole and probed."""
    from otmel.backend import load_backend

    backend = load_backend(uri, s3_endpoint, encoder=False)
    shapes = backend.feature_shapes()
    if shapes is None:  # an older export without the shapes: open its encoder to probe them
        backend = load_backend(uri, s3_endpoint)
        shapes = backend.feature_shapes()
    return backend, shapes
