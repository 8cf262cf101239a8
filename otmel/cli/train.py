"""`otmel train` (Ray Train) and `otmel evaluate` (a checkpoint on a dataset split)."""

from __future__ import annotations

import json
from pathlib import Path

from otmel.cli.common import integer, location, model_location, real, say


def train_config(args):
    """The TrainConfig of an ``otmel train`` command line."""
    from otmel.jobs.train import TrainConfig

    model_overrides = {}
    if args.missing_image:
        model_overrides["missing_image"] = args.missing_image
    if args.text_length:
        model_overrides["text_length"] = args.text_length
    cfg = TrainConfig(data=args.data, out=args.out, mode=args.mode, workers=args.workers, gpu=args.gpu,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
                      lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip,
                      clip=args.clip, tiny_clip=args.tiny_clip, resume=args.resume, address=args.address,
                      name=args.name, eval_every=args.eval_every, eval_retrieve=args.eval_retrieve,
                      max_failures=args.max_failures, seed=args.seed, s3_endpoint=args.s3_endpoint,
                      cpus_per_worker=args.cpus_per_worker, model=model_overrides or None,
                      preprocess=args.preprocess)
    return cfg


def cmd_train(args) -> int:
    from otmel.jobs.train import run

    cfg = train_config(args)
    result = run(cfg)
    m = result.metrics
    say(f"trained {cfg.mode} for {m.get('epoch', -1) + 1} epochs ({m.get('step')} steps): train loss "
           f"{m.get('train_loss', float('nan')):.4f}, dev MRR {m.get('dev_MRR', float('nan')):.4f}")
    if result.skipped:
        say(f"skipped training rows: {result.skipped}")
    say(f"run: {result.run_uri}\nlatest checkpoint: {result.latest_checkpoint}\nbest checkpoint: {result.best_checkpoint}")
    return 0


def cmd_evaluate(args) -> int:
    from otmel.data.pairs import load_split
    from otmel.evaluation import evaluate
    from otmel.model.factory import load_model
    from otmel.metrics import format_metrics
    from otmel.io.storage import is_remote, join, local_copy, write_bytes

    with local_copy(args.checkpoint, args.s3_endpoint) as ckpt_dir:
        model, pre = load_model(ckpt_dir)
    kb, mentions = load_split(args.data, args.split, args.s3_endpoint)
    metrics = evaluate(model, pre, mentions, kb, batch_size=args.batch_size, retrieve=args.retrieve)
    skipped = metrics["skipped_unknown_gold"] + metrics["skipped_unusable"]
    say(f"{args.split}: N = {metrics['count']} mentions ({skipped} skipped and counted as misses: "
           f"{metrics['skipped_unknown_gold']} gold not in the KB, {metrics['skipped_unusable']} unusable), "
           f"{metrics['entities']} entities; ranks count ties against the model")
    say(f"  {format_metrics(metrics)}")
    say(f"  {metrics['tied_golds']} gold(s) tied with another entity; H@1 with ties broken at random: "
           f"{100 * metrics['H@1_random_ties']:.2f}")
    out = args.out or join(args.checkpoint, f"eval-{args.split}.json")
    if not is_remote(out):
        out = str(Path(out))
    write_bytes(out, json.dumps(metrics, indent=2).encode(), args.s3_endpoint)
    say(f"metrics written to {out}")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("train", help="distributed training on Ray Train (checkpoints to a local dir or s3://)")
    s.add_argument("--data", type=location, required=True, help="dataset URI (kb.parquet + mentions/{train,dev}.parquet)")
    s.add_argument("--out", type=location, required=True, help="run storage URI (local dir or s3://bucket/prefix)")
    s.add_argument("--mode", default="kd", choices=["ot", "att", "kd"])
    s.add_argument("--workers", type=integer(1), default=2)
    s.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    s.add_argument("--epochs", type=integer(1), default=20, help="training epochs (default 20, the authors' release)")
    s.add_argument("--batch-size", type=integer(1), default=256, help="GLOBAL batch (each worker gets B / workers)")
    s.add_argument("--lr", type=real(above=0), default=2e-5)
    s.add_argument("--head-lr", type=real(above=0), default=None, help="learning rate of the OT-MEL heads (default: --lr)")
    s.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant (default, the release) or cosine decay to 0 at the last epoch")
    s.add_argument("--warmup-steps", type=integer(0), default=0, help="linear learning-rate warm-up steps")
    s.add_argument("--grad-clip", type=real(above=0), default=None, metavar="NORM",
                   help="clip the global gradient norm (default: no clipping, the release)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--clip", type=model_location, default=None, help="pretrained CLIP: hub name or local directory")
    g.add_argument("--tiny-clip", action="store_true", help="tiny random CLIP (tests, CPU demo)")
    s.add_argument("--missing-image", choices=["zeros", "mask"], default=None)
    s.add_argument("--text-length", type=integer(3), default=None)
    s.add_argument("--resume", action="store_true", help="continue the run in --out/--name from its latest checkpoint")
    s.add_argument("--name", default="otmel-train", help="run name (the run dir is OUT/NAME)")
    s.add_argument("--eval-every", type=integer(0), default=1, help="dev evaluation every N epochs (0 = never)")
    s.add_argument("--eval-retrieve", type=integer(1), default=None, metavar="K",
                   help="dev evaluation by retrieve K + rerank instead of exhaustive")
    s.add_argument("--max-failures", type=integer(-1), default=2, help="worker failures to survive")
    s.add_argument("--cpus-per-worker", type=real(above=0), default=0.5)
    s.add_argument("--preprocess", choices=["auto", "tasks", "inline"], default="auto",
                   help="where pairs are tokenised and their images processed: Ray Data CPU tasks beside the "
                        "workers, or inline in each worker (default auto: tasks with --gpu, inline on CPU)")
    s.add_argument("--seed", type=integer(0), default=0)
    s.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    s.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="H@1/3/5 and MRR of a checkpoint on a dataset split")
    s.add_argument("--checkpoint", type=location, required=True)
    s.add_argument("--data", type=location, required=True)
    s.add_argument("--split", default="test", choices=["train", "dev", "test"])
    s.add_argument("--retrieve", type=integer(1), default=None, metavar="K",
                   help="retrieve K candidates by the separable score, then rerank with the full S_O")
    s.add_argument("--batch-size", type=integer(1), default=64)
    s.add_argument("--out", type=location, default=None, help="metrics JSON path (default: CHECKPOINT/eval-SPLIT.json)")
    s.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    s.set_defaults(func=cmd_evaluate)
