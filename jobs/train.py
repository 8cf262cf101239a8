"""Distributed OT-MEL training on Ray Train (``otmel train``). One cohesive thing over ~500 lines:
the run's config, its worker loop and the checkpoint/resume rules that loop writes and reads.

    otmel train --data DATA_URI --out RUN_URI --mode ot|att|kd --workers N [--gpu]
                [--epochs E] [--batch-size B] [--lr LR] [--lr-schedule constant|cosine]
                [--grad-clip NORM] [--clip NAME_OR_DIR | --tiny-clip] [--resume] [--address ADDR]

* ``TorchTrainer`` with DDP (``prepare_model``); one worker per GPU on a cluster, CPU workers
  with gloo here (fractional CPUs so Ray Data's tasks can run beside them).
* Data: the driver joins mentions with their gold KB rows (skipped rows counted) and puts
  the raw pairs in the object store once. Every epoch the whole training set is reshuffled
  from (seed, epoch) (``otmel.training.loop.global_batches``) and each worker takes ITS share of
  every global batch, in order: N workers step on exactly the batches one process would,
  and every pair is seen once per epoch. Where the pairs are tokenised and their images
  decoded and CLIP-processed is ``--preprocess``: ``tasks``, a Ray Data pipeline per worker
  (CPU tasks beside it, so a GPU is not kept waiting), or ``inline``, in the worker's own
  process; ``auto`` (the default) is ``tasks`` with GPUs and ``inline`` on CPU, where the
  tasks would take the workers' own cores and the pipeline's executor, running in each
  worker, cost more CPU than the preprocessing it moved (bench/results/train_preprocess.md). The rows received are checked against the schedule
  at every step; each epoch's metrics record how many pairs were seen and a digest of
  their order.
* Global in-batch negatives (``otmel.training.distributed``): every loss term sees all B entities.
* Checkpoints (config.json + model.safetensors + tokenizer/processor files + optimizer and
  scheduler state + train_state.json + checksums.json, written last) are reported to
  ``RunConfig(storage_path=RUN_URI)``; the best by dev MRR and the latest are kept. A worker
  failure restores from the latest checkpoint (``FailureConfig``); ``--resume`` continues a
  stopped run at the next epoch boundary. On restore every rank copies the checkpoint into a
  directory of its own (Ray's shared download directory lets one worker rewrite files another
  is reading, ray-project/ray#48726), verifies sizes and checksums, and records digests of
  the model and optimizer state it restored in ``train_state.json``.
* Defaults follow the authors' release where the paper is silent: a constant learning rate,
  no gradient clipping, 20 epochs (``--lr-schedule cosine``, ``--grad-clip`` exist).
* ``metrics.jsonl`` and ``training_curves.png`` are written into the run directory.

This module is thin: the model, losses, data order and evaluation are ``otmel`` library code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class TrainConfig:
    """Everything a training run needs; passed to Ray workers as a dict and rebuilt there."""

    data: str  # dataset URI: kb.parquet + mentions/{train,dev}.parquet (local dir or s3://)
    out: str  # run storage URI (RunConfig.storage_path): local dir or s3://
    mode: str = "kd"  # ot | att | kd
    workers: int = 2  # Ray Train workers (one per GPU on a cluster)
    gpu: bool = False  # one GPU per worker, bf16 autocast
    epochs: int = 20  # the release's (the paper does not say)
    batch_size: int = 256  # GLOBAL batch (paper): each worker gets batch_size / workers
    lr: float = 2e-5  # CLIP towers (paper)
    head_lr: float | None = None  # OT-MEL heads (None = lr)
    lr_schedule: str = "constant"  # constant (the release) | cosine (decays to 0 at the last epoch)
    grad_clip: float | None = None  # max global gradient norm; None = no clipping (the release)
    warmup_steps: int = 0
    clip: str | None = None  # hub name / local dir of the pretrained CLIP
    tiny_clip: bool = False  # tiny random CLIP (tests, CPU demo)
    resume: bool = False
    address: str | None = None  # Ray cluster address (None = local instance)
    name: str = "otmel-train"  # run name: the run dir is RUN_URI/name
    eval_every: int = 1  # dev evaluation every N epochs (0 = never)
    eval_retrieve: int | None = None  # dev eval by retrieve K + rerank (None = exhaustive)
    max_failures: int = 2  # worker failures survived (FailureConfig)
    cpus_per_worker: float = 0.5  # fractional on small machines: leaves room for Ray Data
    seed: int = 0
    s3_endpoint: str | None = None
    model: dict | None = None  # ModelConfig overrides (dim, text_length, missing_image, ...)
    preprocess: str = "auto"  # tasks (Ray Data CPU tasks) | inline (in each worker) | auto (tasks with GPUs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_uri(self) -> str:
        from otmel.io.storage import join

        return join(self.out, self.name)


# ---------------------------------------------------------------------- driver-side checks
def _model_config(cfg: TrainConfig):
    from otmel.model.factory import TINY
    from otmel.model.otmel import ModelConfig

    overrides = dict(TINY) if cfg.tiny_clip else {}
    overrides.update(cfg.model or {})
    return ModelConfig(mode=cfg.mode, clip=cfg.clip if not cfg.tiny_clip else None, **overrides)


def _tiny_words(kb: pa.Table, mentions: pa.Table, limit: int = 4000) -> list[str]:
    """Whole-word vocabulary of a tiny tokenizer: the most frequent words of the data."""
    from collections import Counter

    counts: Counter = Counter()
    for col in (kb.column("name"), kb.column("attributes"), mentions.column("mention"), mentions.column("text")):
        for text in col.to_pylist():
            counts.update(w for w in (text or "").lower().split() if w.isalpha())
    return [w for w, _ in counts.most_common(limit)]


def find_latest_checkpoint(run_uri: str, s3_endpoint: str | None = None) -> str | None:
    """The newest COMPLETE checkpoint dir of a run (by the step in its train_state.json), or
    None. Complete = its checksums.json is there and every file it lists has its recorded
    size: a run whose driver was killed mid-upload leaves a checkpoint dir with some files
    and not others (uploads run in parallel, in no order); that one is skipped, with a
    warning, and the run resumes from the one before it."""
    import pyarrow.fs as pafs

    from otmel.io.integrity import CHECKSUMS_FILE
    from otmel.io.storage import join, resolve

    fs, path = resolve(run_uri, s3_endpoint)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    best, best_step = None, -1
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        files = {i.base_name: i for i in fs.get_file_info(pafs.FileSelector(info.path))}
        if TRAIN_STATE_FILE not in files:
            continue
        with fs.open_input_stream(files[TRAIN_STATE_FILE].path) as f:
            step = json.loads(f.read())["step"]
        if step <= best_step:
            continue
        missing = _incomplete_files(fs, files, CHECKSUMS_FILE)
        if missing:
            log.warning("skipping checkpoint %s (step %d): incomplete, an interrupted save or upload (%s)",
                        join(run_uri, info.base_name), step, missing)
            continue
        best, best_step = join(run_uri, info.base_name), step
    return best


def _incomplete_files(fs, files: dict, checksums_name: str) -> str:
    """What a checkpoint dir lacks against its checksums.json ('' when complete)."""
    if checksums_name not in files:
        return f"no {checksums_name}"
    with fs.open_input_stream(files[checksums_name].path) as f:
        table = json.loads(f.read())
    bad = [name for name, want in sorted(table.items()) if name not in files or files[name].size != want["size"]]
    return f"{len(bad)} file(s) missing or short: {', '.join(bad[:5])}" if bad else ""


def preflight(cfg: TrainConfig) -> dict:
    """Every check a user can fix, before any worker starts: one clear error each."""
    from otmel.data.pairs import load_split
    from otmel.io.storage import exists, probe_writable, read_bytes

    from otmel.training.loop import SCHEDULES

    if cfg.mode not in ("ot", "att", "kd"):
        raise ValueError(f"--mode must be ot, att or kd, got {cfg.mode!r}")
    if cfg.preprocess not in PREPROCESS_CHOICES:
        raise ValueError(f"--preprocess must be {', '.join(PREPROCESS_CHOICES)}, got {cfg.preprocess!r}")
    if cfg.lr_schedule not in SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {cfg.lr_schedule!r}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise ValueError(f"--grad-clip must be > 0 (omit it for no clipping), got {cfg.grad_clip}")
    if cfg.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    if cfg.workers < 1:
        raise ValueError("--workers must be >= 1")
    if cfg.batch_size % cfg.workers:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --workers {cfg.workers} (global batch)")
    if cfg.batch_size // cfg.workers < 2:
        raise ValueError("each worker needs at least 2 pairs per batch for in-batch negatives")
    if not cfg.tiny_clip and not cfg.clip:
        raise ValueError("give --clip NAME_OR_DIR (e.g. openai/clip-vit-base-patch32) or --tiny-clip")
    kb, train = load_split(cfg.data, "train", cfg.s3_endpoint)
    dev = None
    if cfg.eval_every:
        _, dev = load_split(cfg.data, "dev", cfg.s3_endpoint)
    exists(cfg.out, cfg.s3_endpoint)  # reachability of the run storage (bounded timeouts)
    latest = find_latest_checkpoint(cfg.run_uri, cfg.s3_endpoint)
    if latest and not cfg.resume:
        raise ValueError(f"{cfg.run_uri} already holds a run (latest {latest}); pass --resume to continue it "
                         "or choose another --out / --name")
    if cfg.resume and not latest:
        raise ValueError(f"--resume: no checkpoint under {cfg.run_uri}")
    if latest:
        saved = json.loads(read_bytes(f"{latest}/config.json", cfg.s3_endpoint))
        want = _model_config(cfg).to_dict()
        for key in ("mode", "dim", "input_width", "text_length", "pooling", "missing_image"):
            if saved.get(key) != want.get(key):
                raise ValueError(f"--resume: the checkpoint in {latest} has {key}={saved.get(key)!r} but this run asks "
                                 f"{key}={want.get(key)!r}")
    probe_writable(cfg.out, cfg.s3_endpoint, "--out")  # last: the checks above write nothing
    return {"kb": kb, "train": train, "dev": dev, "latest": latest}


# ---------------------------------------------------------------------- Ray Data preprocessing
def pairs_table(kb: pa.Table, mentions: pa.Table) -> tuple[pa.Table, dict]:
    """Mentions joined with their gold KB rows (``entity_*`` columns); skipped rows counted."""
    from otmel.data.pairs import usable_pairs

    rows, gold_rows, skipped = usable_pairs(mentions, kb)
    m = mentions.take(pa.array(rows, pa.int64())).select(["mention", "text", "image"])
    e = kb.take(pa.array(gold_rows, pa.int64())).select(["entity_id", "name", "attributes", "image"])
    # entity_code (the gold's KB row) identifies the entity inside batches: Ray's torch
    # batches carry numbers only, and equal codes = equal entities for negative masking
    cols = {"mention": m["mention"], "text": m["text"], "image": m["image"],
            "entity_code": pa.array(gold_rows, pa.int64()),
            "entity_name": e["name"], "entity_attributes": e["attributes"], "entity_image": e["image"]}
    return pa.table(cols), dict(skipped)


def preprocess_pair_rows(batch: dict[str, np.ndarray], pairs: list, preprocessor) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: ``pair_row`` numbers -> model input arrays of those rows
    of ``pairs_table`` (``pairs = [ObjectRef of the table]``, read zero-copy on each node)."""
    import ray

    table = ray.get(pairs[0])
    rows = np.asarray(batch["pair_row"], dtype=np.int64)
    sub = table.take(pa.array(rows)).to_pydict()
    mb = preprocessor.mentions({"mention": sub["mention"], "text": sub["text"], "image": sub["image"]})
    eb = preprocessor.entities({"name": sub["entity_name"], "attributes": sub["entity_attributes"],
                                "image": sub["entity_image"]})
    out = {"pair_row": rows, "entity_code": np.asarray(sub["entity_code"], dtype=np.int64)}
    for prefix, b in (("m_", mb), ("e_", eb)):
        out[prefix + "input_ids"] = b.input_ids
        out[prefix + "attention_mask"] = b.attention_mask
        out[prefix + "pixel_values"] = b.pixel_values
        out[prefix + "has_image"] = b.has_image
    return out


#: where a worker's pairs are preprocessed (``--preprocess``)
PREPROCESS_CHOICES = ("auto", "tasks", "inline")


def preprocess_inline(cfg: TrainConfig) -> bool:
    """``--preprocess`` resolved: ``auto`` is inline on CPU, Ray Data tasks with GPUs."""
    return cfg.preprocess == "inline" or (cfg.preprocess == "auto" and not cfg.gpu)


def epoch_batches(pairs: list, rows: np.ndarray, step_sizes: list[int], preprocessor, device, inline: bool = False):
    """This worker's batches of one epoch, in schedule order: its ``rows`` (one Ray Data
    block per step) preprocessed on CPU tasks, or with ``inline`` in this process, and
    yielded as torch batches on ``device``; each batch is checked against the schedule (a
    data-order bug fails loudly)."""
    bounds = np.cumsum([0, *step_sizes])
    if inline:
        import torch

        batches = ({k: torch.as_tensor(v).to(device) for k, v in
                    preprocess_pair_rows({"pair_row": rows[a:b]}, pairs, preprocessor).items()}
                   for a, b in zip(bounds[:-1], bounds[1:]))
    else:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the schedule's order, whatever task finishes first
        ctx.enable_progress_bars = False  # one pipeline per worker per epoch: keep the logs quiet
        blocks = [pa.table({"pair_row": rows[a:b]}) for a, b in zip(bounds[:-1], bounds[1:])]
        ds = ray.data.from_arrow(blocks).map_batches(
            preprocess_pair_rows, batch_size=None, num_cpus=PREPROCESS_CPUS,
            fn_kwargs={"pairs": pairs, "preprocessor": preprocessor})
        batches = ds.iter_torch_batches(batch_size=max(step_sizes), device=device, drop_last=False)
    for step, batch in enumerate(batches):
        want = rows[bounds[step]:bounds[step + 1]]
        got = batch["pair_row"].cpu().numpy()
        if not np.array_equal(got, want):
            raise RuntimeError(f"data order broken at step {step} of the epoch: got pair rows {got[:5]}..., "
                               f"the schedule says {want[:5]}...")
        yield batch


#: CPUs of a preprocessing task (fractional: Ray Train workers and these tasks share small machines)
PREPROCESS_CPUS = 0.25


def _inputs(batch: dict, prefix: str) -> dict:
    return {k: batch[prefix + k] for k in ("input_ids", "attention_mask", "pixel_values", "has_image")}


# ---------------------------------------------------------------------- the worker loop
def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: thin over otmel.training.loop / otmel.evaluation."""
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from otmel.training.distributed import make_entity_gather
    from otmel.model.otmel import OTMEL, ModelConfig
    from otmel.training.loop import OptimConfig, clip_gradients, global_batches, make_optimizer, state_digest, worker_rows

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(os.environ.get("OTMEL_TORCH_THREADS", "1"))))
    model = OTMEL(ModelConfig.from_dict(config["model"]))
    preprocessor = config["preprocessor"]
    n_pairs = config["n_pairs"]
    steps_per_epoch = len(global_batches(n_pairs, cfg.batch_size, cfg.seed, 0, world))

    device = ray.train.torch.get_device()
    model = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) if world > 1 else model.to(device)
    core = getattr(model, "module", model)
    opt, sched = make_optimizer(core, OptimConfig(lr=cfg.lr, head_lr=cfg.head_lr, schedule=cfg.lr_schedule,
                                                  warmup_steps=cfg.warmup_steps,
                                                  total_steps=steps_per_epoch * cfg.epochs, grad_clip=cfg.grad_clip))

    start_epoch, step, history, best, resumes = 0, 0, [], None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        restored = restore_checkpoint(checkpoint, rank)
        core.load_state_dict(restored["model"])
        opt.load_state_dict(restored["optimizer"]["optimizer"])
        sched.load_state_dict(restored["optimizer"]["scheduler"])
        state = restored["train_state"]
        start_epoch, step, history, best = state["epoch"] + 1, state["step"], state["history"], state.get("best_dev_MRR")
        # an audit trail of restores: digests of the state actually in memory now, which
        # must equal the digests of the checkpoint's files
        resumes = state.get("resumes", []) + [{
            "step": step, "epoch": start_epoch, "checkpoint": restored["where"],
            "model_sha256": state_digest(core.state_dict()), "optimizer_sha256": state_digest(opt.state_dict())}]
        log.info("rank %d resumed at epoch %d, step %d from %s", rank, start_epoch, step, restored["where"])

    gather = make_entity_gather()
    use_bf16 = cfg.gpu and torch.cuda.is_available()
    dev_data = None  # (kb, dev mentions), loaded on first use

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, sums, n = time.perf_counter(), {}, 0
        batches = global_batches(n_pairs, cfg.batch_size, cfg.seed, epoch, world)
        rows, step_sizes = worker_rows(batches, rank, world)
        for batch in epoch_batches(config["pairs"], rows, step_sizes, preprocessor, device, preprocess_inline(cfg)):
            ids = [str(x) for x in batch["entity_code"].tolist()]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                losses = model(_inputs(batch, "m_"), _inputs(batch, "e_"), ids, gather=gather)
            if not torch.isfinite(losses["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            (losses["loss"] * world).backward()  # DDP averages; see otmel.training.distributed
            clip_gradients(model, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            n += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * world
        if n != len(step_sizes):
            raise RuntimeError(f"worker {rank} trained {n} steps of epoch {epoch}, the schedule has {len(step_sizes)}")
        # the epoch's mean loss over all workers (each reports its share of the global loss)
        loss_t = torch.tensor([sums.get("loss", 0.0) / n], dtype=torch.float64)
        seen = [rows]
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(loss_t)
            loss_t /= world
            seen = [None] * world
            dist.all_gather_object(seen, rows)
        metrics = {"epoch": epoch, "step": step, "train_loss": float(loss_t), "epoch_seconds": time.perf_counter() - t0}
        metrics.update({f"train_{k}": v / n for k, v in sums.items() if k != "loss"})
        metrics.update(order_summary(seen, step_sizes, n_pairs))
        dev_metrics = {}
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and rank == 0:
            if dev_data is None:  # read once, on the rank that evaluates
                from otmel.data.pairs import load_split

                dev_data = load_split(cfg.data, "dev", cfg.s3_endpoint)
            dev_metrics = _dev_eval(core, preprocessor, cfg, *dev_data)
        if world > 1:  # every rank reports the same dev figures (rank 0 computed them)
            import torch.distributed as dist

            holder = [dev_metrics]
            dist.broadcast_object_list(holder, src=0)
            dev_metrics = holder[0]
        metrics.update(dev_metrics)
        if "dev_MRR" in metrics and (best is None or metrics["dev_MRR"] > best):
            best = metrics["dev_MRR"]
        if best is not None:
            metrics["best_dev_MRR"] = best
        history.append(metrics)

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_training_checkpoint(tmp, core, preprocessor, opt, sched,
                                         {"epoch": epoch, "step": step, "history": history, "best_dev_MRR": best,
                                          "resumes": resumes})
                _write_run_files(cfg, history)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            # finite numbers only: Ray's checkpoint-manager snapshot stores NaN as null, which
            # breaks its best-checkpoint ordering when a run is resumed
            report = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            ray.train.report(report, checkpoint=ckpt)


def order_summary(seen: list[np.ndarray], step_sizes: list[int], n_pairs: int) -> dict:
    """What the workers trained on this epoch (``seen[r]`` = rank r's pair rows in order):
    pairs seen, distinct pairs, and a digest of the global order (global batch b = every
    rank's b-th piece, in rank order)."""
    import hashlib

    bounds = np.cumsum([0, *step_sizes])
    order = np.concatenate([rows[a:b] for a, b in zip(bounds[:-1], bounds[1:]) for rows in seen]) if step_sizes else \
        np.zeros(0, np.int64)
    return {"pairs_total": int(n_pairs), "pairs_seen": int(len(order)), "distinct_pairs_seen": int(len(np.unique(order))),
            "order_sha256": hashlib.sha256(order.astype(np.int64).tobytes()).hexdigest()[:16]}


def save_training_checkpoint(directory: str, model, preprocessor, optimizer, scheduler, train_state: dict) -> None:
    """Model checkpoint + optimizer/scheduler + train state, then checksums.json (last)."""
    import torch

    from otmel.model.factory import save_model
    from otmel.io.integrity import write_checksums

    save_model(model, preprocessor, directory)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(directory, OPTIMIZER_FILE))
    Path(directory, TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=2))
    write_checksums(directory)


def restore_checkpoint(checkpoint, rank: int) -> dict:
    """Load a reported checkpoint on one worker: model weights, optimizer/scheduler state,
    train state (and where it came from).

    A remote checkpoint is copied into a directory of this rank's own, never Ray's shared
    temp directory: with ``as_directory()`` / ``to_directory()`` a worker that arrives after
    another's download has finished downloads again INTO THE SAME directory, rewriting
    files the first is reading (EOFError in torch.load; ray-project/ray#48726). Every
    file's size and sha256 are checked against ``checksums.json`` before anything is read.
    """
    import shutil

    import pyarrow.fs as pafs
    import torch
    from safetensors.torch import load_file

    from otmel.io.integrity import verify_checksums

    where = checkpoint.path
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        local, cleanup = checkpoint.path, None
    else:
        cleanup = tempfile.mkdtemp(prefix=f"otmel-restore-rank{rank}-")
        local = checkpoint.to_directory(cleanup)
    try:
        verify_checksums(local)
        return {"model": load_file(os.path.join(local, "model.safetensors")),
                "optimizer": torch.load(os.path.join(local, OPTIMIZER_FILE), weights_only=True),
                "train_state": json.loads(Path(local, TRAIN_STATE_FILE).read_text()),
                "where": where}
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)


def _dev_eval(model, preprocessor, cfg: TrainConfig, kb: pa.Table, dev: pa.Table) -> dict:
    from otmel.evaluation import evaluate

    model.eval()
    m = evaluate(model, preprocessor, dev, kb, retrieve=cfg.eval_retrieve, compare_exhaustive=False)
    model.train()
    return {f"dev_{k}": v for k, v in m.items() if k in ("H@1", "H@3", "H@5", "MRR", "seconds")
            or k.startswith("recall@")}


def _write_run_files(cfg: TrainConfig, history: list[dict]) -> None:
    """metrics.jsonl and training_curves.png into the run directory (rewritten each epoch)."""
    from otmel.training.plots import plot_training_curves
    from otmel.io.storage import join, write_bytes

    lines = "\n".join(json.dumps(h, sort_keys=True) for h in history) + "\n"
    write_bytes(join(cfg.run_uri, "metrics.jsonl"), lines.encode(), cfg.s3_endpoint)
    write_bytes(join(cfg.run_uri, "training_curves.png"), plot_training_curves(history), cfg.s3_endpoint)


# ---------------------------------------------------------------------- driver
@dataclass
class TrainResult:
    run_uri: str
    latest_checkpoint: str | None
    best_checkpoint: str | None
    metrics: dict
    skipped: dict


def run(cfg: TrainConfig, ray_init_kwargs: dict | None = None) -> TrainResult:
    """Preflight, start (or join) Ray, train, return where the checkpoints are."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from otmel.model.factory import create_model
    from otmel.jobs.common import connect_ray, worker_env
    from otmel.io.storage import resolve

    checks = preflight(cfg)
    model_cfg = _model_config(cfg)
    words = _tiny_words(checks["kb"], checks["train"]) if cfg.tiny_clip else ()
    model, pre = create_model(model_cfg, tiny=cfg.tiny_clip, words=words)
    model_cfg_dict = model.config.to_dict()
    model_cfg_dict["clip_config"] = model.encoder.clip.config.to_dict()
    if not cfg.tiny_clip:  # workers load the pretrained weights themselves
        model_cfg_dict["clip_config"] = None
    del model

    pairs, skipped = pairs_table(checks["kb"], checks["train"])
    if skipped:
        log.warning("train split: skipped %s", skipped)
    if pairs.num_rows < cfg.batch_size:
        raise ValueError(f"train split has {pairs.num_rows} usable pairs, fewer than one batch of {cfg.batch_size}")

    if not ray.is_initialized():
        # the job's actors (Ray Train's controller included) persist to RUN_URI themselves:
        # give them the driver's AWS settings (credentials: see worker_env)
        kwargs = dict(ray_init_kwargs or {})
        kwargs.setdefault("runtime_env", {"env_vars": worker_env()})
        connect_ray(cfg.address, **kwargs)
    # the raw pairs, once, in the object store: each worker's per-epoch pipeline reads its rows
    pairs_ref = ray.put(pairs)
    fs, storage_path = resolve(cfg.out, cfg.s3_endpoint)
    scaling = ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                      resources_per_worker=None if cfg.gpu else {"CPU": cfg.cpus_per_worker})
    run_config = ray.train.RunConfig(
        name=cfg.name, storage_path=storage_path, storage_filesystem=fs,
        # keep the best by dev MRR (+ Ray always keeps the latest); without dev evaluation, the last two
        checkpoint_config=(ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="dev_MRR",
                                                      checkpoint_score_order="max")
                           if cfg.eval_every else ray.train.CheckpointConfig(num_to_keep=2)),
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        worker_runtime_env={"env_vars": worker_env()},
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        # [ref]: a nested ObjectRef reaches the workers as a reference (they read it), not a copy
        train_loop_config={"train": cfg.to_dict(), "model": model_cfg_dict, "preprocessor": pre,
                           "n_pairs": pairs.num_rows, "pairs": [pairs_ref]},
        scaling_config=scaling, run_config=run_config,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    best = None
    if result.best_checkpoints:
        scored = [(m.get("dev_MRR", float("nan")), c) for c, m in result.best_checkpoints]
        scored = [(s, c) for s, c in scored if s == s]
        if scored:
            best = _uri_of(cfg, max(scored, key=lambda t: t[0])[1])
    latest = find_latest_checkpoint(cfg.run_uri, cfg.s3_endpoint)
    return TrainResult(cfg.run_uri, latest, best or latest, dict(result.metrics or {}), skipped)


def _uri_of(cfg: TrainConfig, checkpoint) -> str:
    from otmel.io.storage import join

    return join(cfg.run_uri, Path(checkpoint.path).name)
