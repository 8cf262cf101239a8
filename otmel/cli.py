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

Errors a user can fix (bad paths, schemas, checkpoints) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("otmel")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "filelock", "urllib3", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print(msg: str) -> None:
    print(msg, flush=True)


def cmd_synth(args) -> int:
    from otmel.synth import write_synthetic_dataset

    report = write_synthetic_dataset(args.out, n_entities=args.entities, n_mentions=args.mentions, seed=args.seed,
                                     missing_image_rate=args.missing_image_rate)
    _print(f"wrote synthetic dataset to {args.out}: {report}")
    return 0


def cmd_import_mimic(args) -> int:
    from otmel.mimic import import_mimic

    report = import_mimic(args.root, args.dataset, args.out)
    _print(f"imported {args.dataset} from {args.root} to {args.out}: {report}")
    return 0


def cmd_train(args) -> int:
    from otmel.jobs.train import TrainConfig, run

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
    result = run(cfg)
    m = result.metrics
    _print(f"trained {cfg.mode} for {m.get('epoch', -1) + 1} epochs ({m.get('step')} steps): train loss "
           f"{m.get('train_loss', float('nan')):.4f}, dev MRR {m.get('dev_MRR', float('nan')):.4f}")
    if result.skipped:
        _print(f"skipped training rows: {result.skipped}")
    _print(f"run: {result.run_uri}\nlatest checkpoint: {result.latest_checkpoint}\nbest checkpoint: {result.best_checkpoint}")
    return 0


def cmd_kge(args) -> int:
    """otmel kge train | features | evaluate | embed: OTKGE entity embeddings (single process)."""
    import json

    from otmel.kge.training import KGETrainConfig, entity_embeddings, load_checkpoint, train

    if args.kge_command == "train":
        cfg = KGETrainConfig(triples=args.triples, out=args.out, model=args.model, modalities=args.modalities,
                             fusion=args.fusion, features=args.features, entity_map=args.entity_map, dim=args.dim,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                             loss=args.loss, reg=args.reg, negatives=args.negatives, eval_every=args.eval_every,
                             seed=args.seed, s3_endpoint=args.s3_endpoint)
        progress = (lambda e: print(f"epoch {e['epoch'] + 1}/{cfg.epochs}: loss {e['loss']:.4f}"
                                    + (f", valid MRR {e['valid']['mrr']:.4f}" if "valid" in e else ""),
                                    file=sys.stderr, flush=True))  # stdout: the metrics JSON only
        metrics = train(cfg, progress=progress)
        skipped = metrics["data"]["skipped"]
        if skipped:
            print(f"skipped triples: {json.dumps(skipped)}", file=sys.stderr)
        print(json.dumps(metrics["test"]))
        return 0
    if args.kge_command == "features":
        from otmel.kge.clip_features import encode_kb_features

        r = encode_kb_features(args.model, args.kb, args.out, args.batch_size, args.s3_endpoint,
                               tuple(args.allow_image_prefix or ()), progress=log.info)
        print(json.dumps({"entities": r.entities, "without_image": r.without_image, "skipped": dict(r.skipped),
                          "bad_images": dict(r.bad_images), "ling_dim": r.ling_dim, "visual_dim": r.visual_dim,
                          "out": args.out}))
        return 0
    if args.kge_command == "evaluate":
        from otmel.kge.data import load_triples
        from otmel.kge.evaluation import evaluate

        model, entities, rels = load_checkpoint(args.checkpoint, args.s3_endpoint)
        data = load_triples(args.triples, args.s3_endpoint)
        if data.entities != entities or data.relations != rels:
            raise ValueError(f"{args.triples}: its training triples give other entities/relations than the "
                             f"checkpoint was trained on ({len(data.entities)}/{len(data.relations)} vs "
                             f"{len(entities)}/{len(rels)})")
        if args.split not in data.splits:
            raise ValueError(f"{args.triples}: no {args.split} split")
        print(json.dumps(evaluate(model, data, args.split)))
        return 0
    from otmel.storage import write_parquet

    model, entities, _ = load_checkpoint(args.checkpoint, args.s3_endpoint)
    table = entity_embeddings(model, entities)
    import pyarrow as pa
    import pyarrow.compute as pc

    coverage = ""
    if args.kb:  # keep the KB's entities; say which of each side the other lacks
        from otmel.storage import read_parquet

        kb_ids = set(read_parquet(args.kb, args.s3_endpoint, ["entity_id"]).column("entity_id").to_pylist())
        in_kb = pc.is_in(table.column("entity_id"), value_set=pa.array(sorted(e for e in kb_ids if e is not None),
                                                                      pa.string()))
        kg_only = table.num_rows - pc.sum(in_kb).as_py()
        table = table.filter(in_kb)
        coverage = (f"; {len(kb_ids) - table.num_rows} of {len(kb_ids)} KB entities are not in the KG (no vector: "
                    f"no coherence for them), {kg_only} KG entities are not in the KB (left out)")
    write_parquet(args.out, table, args.s3_endpoint)
    _print(f"wrote {table.num_rows} entity embeddings of {table.schema.field('vector').type.list_size} dims to "
           f"{args.out}{coverage}")
    return 0


def cmd_export(args) -> int:
    from otmel.exporters.onnx import ExportConfig, ExportError, export

    cfg = ExportConfig(checkpoint=args.checkpoint, out=args.out, opset=args.opset,
                       fp16=args.fp16 or args.precision == "fp16", int8=args.int8 or args.precision == "int8",
                       mode=args.mode, s3_endpoint=args.s3_endpoint)
    try:
        meta = export(cfg)
    except ExportError as exc:
        print(f"otmel export: error: {exc}", file=sys.stderr)
        return 2
    worst = max(meta["parity_max_abs_diff"].values())
    _print(f"exported {meta['export_mode']} ({meta['assignment']}, {meta['precision']}, opset {meta['opset']}) to "
           f"{args.out}: encoder.onnx + matcher.onnx, max |ONNX - PyTorch| = {worst:.2e} "
           f"(tolerance {meta['parity_tolerance']:g}), model_version {meta['model_version'][:12]}")
    return 0


def cmd_evaluate(args) -> int:
    from otmel.data import load_split
    from otmel.evaluation import evaluate
    from otmel.factory import load_model
    from otmel.metrics import format_metrics
    from otmel.storage import is_remote, join, local_copy, write_bytes

    with local_copy(args.checkpoint, args.s3_endpoint) as ckpt_dir:
        model, pre = load_model(ckpt_dir)
    kb, mentions = load_split(args.data, args.split, args.s3_endpoint)
    metrics = evaluate(model, pre, mentions, kb, batch_size=args.batch_size, retrieve=args.retrieve)
    skipped = metrics["skipped_unknown_gold"] + metrics["skipped_unusable"]
    _print(f"{args.split}: N = {metrics['count']} mentions ({skipped} skipped and counted as misses: "
           f"{metrics['skipped_unknown_gold']} gold not in the KB, {metrics['skipped_unusable']} unusable), "
           f"{metrics['entities']} entities; ranks count ties against the model")
    _print(f"  {format_metrics(metrics)}")
    _print(f"  {metrics['tied_golds']} gold(s) tied with another entity; H@1 with ties broken at random: "
           f"{100 * metrics['H@1_random_ties']:.2f}")
    out = args.out or join(args.checkpoint, f"eval-{args.split}.json")
    if not is_remote(out):
        out = str(Path(out))
    write_bytes(out, json.dumps(metrics, indent=2).encode(), args.s3_endpoint)
    _print(f"metrics written to {out}")
    return 0


def cmd_index(args) -> int:
    from otmel.jobs.index import IndexConfig, run, summary_line

    if args.update and args.out:
        raise ValueError("--update names the index to change; do not pass --out with it")
    if not args.update and not args.out:
        raise ValueError("--out INDEX_URI is required (or --update INDEX_URI to change an existing index)")
    cfg = IndexConfig(model=args.model, kb=args.kb, out=args.update or args.out, shards=args.shards,
                      factory=args.factory, feature_dtype=args.feature_dtype, update=bool(args.update),
                      overwrite=args.overwrite, workers=args.workers, nprobe=args.nprobe, batch_size=args.batch_size,
                      gpu=args.gpu, cpus_per_actor=args.cpus_per_actor, image_transform=args.image_transform,
                      address=args.address, s3_endpoint=args.s3_endpoint,
                      allow_image_prefix=args.allow_image_prefix or [], allow_private_hosts=args.allow_private_hosts)
    _print(summary_line(run(cfg)))
    return 0


def cmd_link(args) -> int:
    from otmel.jobs.link import LinkConfig, run, summary_line

    cfg = LinkConfig(model=args.model, index=args.index, input=args.input, output=args.output, top_k=args.top_k,
                     candidates=args.candidates, nil_threshold=args.nil_threshold, workers=args.workers,
                     batch_size=args.batch_size, detect_mentions=args.detect_mentions,
                     context_chars=args.context_chars, min_alias_length=args.min_alias_length,
                     max_alias_entities=args.max_alias_entities, bad_image=args.bad_image,
                     allow_image_prefix=args.allow_image_prefix or [], allow_private_hosts=args.allow_private_hosts,
                     image_timeout_s=args.image_timeout, force=args.force, address=args.address,
                     link_actors=args.link_actors, shard_replicas=args.shard_replicas, shard_gpus=args.shard_gpus,
                     gpu=args.gpu, s3_endpoint=args.s3_endpoint, kge_embeddings=args.kge_embeddings,
                     coherence_weight=args.coherence_weight, cpus_per_actor=args.cpus_per_actor,
                     image_transform=args.image_transform, stall_timeout_s=args.stall_timeout)
    _print(summary_line(run(cfg, progress=log.info)))
    return 0


def cmd_calibrate(args) -> int:
    from otmel.calibration import CalibrateConfig, calibrate

    cfg = CalibrateConfig(model=args.model, index=args.index, data=args.data, split=args.split,
                          candidates=args.candidates, s3_endpoint=args.s3_endpoint, write=not args.dry_run,
                          kge_embeddings=args.kge_embeddings, top_k=args.top_k)
    r = calibrate(cfg)
    _print(f"NIL threshold {r['nil_threshold']:.4f} on {r['mentions']} {args.split} mentions "
           f"({r['nil_gold']} with a gold entity outside the KB): F1 {r['f1']:.4f} (precision {r['precision']:.4f}, "
           f"recall {r['recall']:.4f}) vs F1 {r['f1_no_threshold']:.4f} without a threshold")
    if "coherence" in r:
        c = r["coherence"]
        _print(f"coherence weight {c['weight']:.4g}: top-1 accuracy {c['h1']:.4f} vs {c['h1_without']:.4f} without "
               f"({c['posts_with_several_mentions']} posts with several mentions); NIL threshold with it "
               f"{c['nil_threshold']:.4f} (F1 {c['f1']:.4f})")
    _print(f"stored in {r['stored_in']}" if r.get("stored_in") else "not stored (--dry-run)")
    return 0


def cmd_demo(args) -> int:
    from otmel.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, entities=args.entities, mentions=args.mentions, mode=args.mode, epochs=args.epochs)
    _print(f"otmel demo: synth {cfg.entities} entities / {cfg.mentions} mentions -> train (Ray Train, {cfg.workers} "
           f"workers) -> export ONNX -> index ({cfg.shards} shards) -> calibrate NIL -> link the test split (Ray Data)")
    r = run_demo(cfg, progress=_print)
    m = r["test_linked"]
    keys = ("H@1", "H@3", "H@5", "MRR")
    _print("")
    _print(f"linked test split: {m['count']} mentions against {r['entities']} KB entities "
           f"(retrieve K={cfg.candidates} per shard + rerank with S_O)")
    _print("  " + " ".join(f"{k:>7}" for k in keys))
    _print("  " + " ".join(f"{100 * m[k]:7.2f}" for k in keys))
    _print(f"  chance H@1 {100 * r['chance_H@1']:.2f}, name match only {100 * r['same_name_chance_H@1']:.2f}; "
           f"with the NIL threshold {r['nil_threshold']:.3f}: link precision {100 * m['link_precision']:.1f}%, "
           f"recall {100 * m['link_recall']:.1f}%")
    s = r["link_summary"]
    _print(f"  link job: {s['counts']['in']} rows, {s['mentions_per_second']} mentions/s ({s['link_seconds']} s)")
    _print(f"output Parquet: {r['links']}   index: {r['index']}   model: {r['onnx']}")
    _print(f"metrics: {Path(args.out) / 'metrics.json'}   ({r['seconds']:.0f} s: "
           + ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items()) + ")")
    return 0


def _data_job_options(s: argparse.ArgumentParser) -> None:
    """Options the Ray Data jobs (index, link) share: actors, images, cluster, storage."""
    s.add_argument("--workers", default="auto", metavar="auto|N|MIN-MAX",
                   help="encode actors: N, or MIN-MAX for a pool Ray Data scales with the queue (one GPU each "
                        "on a GPU cluster); auto (default): one per GPU of the cluster, or on CPU one "
                        "single-thread actor per CPU of its nodes")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--gpu", dest="gpu", action="store_const", const=True, default=None,
                   help="a GPU per encode actor even if no GPU node is up yet (the autoscaler adds them)")
    g.add_argument("--cpu", dest="gpu", action="store_const", const=False, help="encode on CPUs even on a GPU cluster")
    s.add_argument("--cpus-per-actor", type=float, default=0.25, metavar="C",
                   help="CPUs of each CPU encode actor; its intra-op threads: C if >= 1, else the node's CPUs over "
                        "the pool's maximum size (the default 0.25 leaves room for the read tasks on small machines)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--image-transform", choices=["auto", "cpu", "device"], default="auto",
                   help="where images are resized and normalised: in the CPU preprocess tasks, or on the encode "
                        "actors' device (their GPU: the CPUs then only decode); auto: device when they have a GPU")
    s.add_argument("--allow-image-prefix", action="append", metavar="DIR", help="local image_uri roots allowed (repeatable)")
    s.add_argument("--allow-private-hosts", action="store_true", help="allow http(s) image_uri on private/loopback hosts")
    s.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    s.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otmel", description="Multimodal entity linking with OT-MEL at cluster scale.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic multimodal dataset (KB + mentions)")
    s.add_argument("--entities", type=int, default=1000)
    s.add_argument("--mentions", type=int, default=5000)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--missing-image-rate", type=float, default=0.4, help="share of KB entities without an image")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("import-mimic", help="convert a MIMIC/MELBench release to an otmel dataset")
    s.add_argument("--root", required=True)
    s.add_argument("--dataset", required=True, choices=["wikimel", "richpediamel", "wikidiverse"])
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_import_mimic)

    s = sub.add_parser("train", help="distributed training on Ray Train (checkpoints to a local dir or s3://)")
    s.add_argument("--data", required=True, help="dataset URI (kb.parquet + mentions/{train,dev}.parquet)")
    s.add_argument("--out", required=True, help="run storage URI (local dir or s3://bucket/prefix)")
    s.add_argument("--mode", default="kd", choices=["ot", "att", "kd"])
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    s.add_argument("--epochs", type=int, default=20, help="training epochs (default 20, the authors' release)")
    s.add_argument("--batch-size", type=int, default=256, help="GLOBAL batch (each worker gets B / workers)")
    s.add_argument("--lr", type=float, default=2e-5)
    s.add_argument("--head-lr", type=float, default=None, help="learning rate of the OT-MEL heads (default: --lr)")
    s.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant (default, the release) or cosine decay to 0 at the last epoch")
    s.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    s.add_argument("--grad-clip", type=float, default=None, metavar="NORM",
                   help="clip the global gradient norm (default: no clipping, the release)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--clip", default=None, help="pretrained CLIP: hub name or local directory")
    g.add_argument("--tiny-clip", action="store_true", help="tiny random CLIP (tests, CPU demo)")
    s.add_argument("--missing-image", choices=["zeros", "mask"], default=None)
    s.add_argument("--text-length", type=int, default=None)
    s.add_argument("--resume", action="store_true", help="continue the run in --out/--name from its latest checkpoint")
    s.add_argument("--name", default="otmel-train", help="run name (the run dir is OUT/NAME)")
    s.add_argument("--eval-every", type=int, default=1, help="dev evaluation every N epochs (0 = never)")
    s.add_argument("--eval-retrieve", type=int, default=None, metavar="K",
                   help="dev evaluation by retrieve K + rerank instead of exhaustive")
    s.add_argument("--max-failures", type=int, default=2, help="worker failures to survive")
    s.add_argument("--cpus-per-worker", type=float, default=0.5)
    s.add_argument("--preprocess", choices=["auto", "tasks", "inline"], default="auto",
                   help="where pairs are tokenised and their images processed: Ray Data CPU tasks beside the "
                        "workers, or inline in each worker (default auto: tasks with --gpu, inline on CPU)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    s.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("export", help="ONNX export (encoder.onnx + matcher.onnx), verified against PyTorch")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--opset", type=int, default=17)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None,
                   help="fp32 (default), fp16 (weights and compute; on a GPU with onnxruntime-gpu's CUDA provider) or "
                        "int8 (dynamic quantisation of the matmul weights: the fastest on CPU; measure its H@1 on "
                        "your data first: bench/results/export.md)")
    g.add_argument("--fp16", action="store_true", help="= --precision fp16")
    g.add_argument("--int8", action="store_true", help="= --precision int8")
    s.add_argument("--mode", choices=["kd", "ot", "att"], default=None,
                   help="default: the checkpoint's own (kd exports its attention path; --mode ot its OT teacher)")
    s.add_argument("--s3-endpoint", default=None)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("kge", help="OTKGE multimodal KG embeddings: train | features | evaluate | embed")
    kge = s.add_subparsers(dest="kge_command", required=True)
    k = kge.add_parser("train", help="train on KG triples (train/valid/test files); prints the filtered test metrics")
    k.add_argument("--triples", required=True, help="directory with train, valid, test (head<TAB>relation<TAB>tail)")
    k.add_argument("--out", required=True, help="checkpoint directory (local or s3://)")
    k.add_argument("--model", default="complex", choices=["complex", "rotate", "transe"])
    k.add_argument("--modalities", default="structure", choices=["structure", "ling", "visual", "all"])
    k.add_argument("--fusion", default="ot", choices=["ot", "mean", "concat"])
    k.add_argument("--features", default=None, help="*.parquet: entity_id + ling / visual vectors (otmel kge features); or a directory of "
                        "ling.npy / visual.npy whose rows entities.txt names")
    k.add_argument("--entity-map", default=None, help="name<TAB>entity_id lines, when triples use other names")
    k.add_argument("--dim", type=int, default=400, help="reals per entity embedding (ComplEx/RotatE: even)")
    k.add_argument("--epochs", type=int, default=50)
    k.add_argument("--batch-size", type=int, default=1000)
    k.add_argument("--lr", type=float, default=0.1)
    k.add_argument("--optimizer", default="adagrad", choices=["adagrad", "adam"])
    k.add_argument("--loss", default="ce", choices=["ce", "logistic"],
                   help="ce: 1-N cross-entropy (strong baseline); logistic: the paper's eq. 6 with negatives")
    k.add_argument("--reg", type=float, default=0.05, help="N3 regularisation weight")
    k.add_argument("--negatives", type=int, default=64, help="logistic loss: corrupted tails per triple")
    k.add_argument("--eval-every", type=int, default=5, help="epochs between validation MRRs (best kept); 0: none")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--s3-endpoint", default=None)
    k = kge.add_parser("features", help="ling / visual entity features from the otmel CLIP encoder over a KB "
                                        "(the --features file of kge train)")
    k.add_argument("--model", required=True, help="otmel checkpoint or ONNX export dir (local or s3://)")
    k.add_argument("--kb", required=True, help="KB Parquet: entity_id, name, attributes, image / image_uri")
    k.add_argument("--out", required=True, help="Parquet file URI: entity_id, ling, visual")
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--allow-image-prefix", action="append", default=None, metavar="DIR",
                   help="local directory whose files image_uri may name (repeatable)")
    k.add_argument("--s3-endpoint", default=None)
    k = kge.add_parser("evaluate", help="filtered MRR and H@1/3/10 of a checkpoint on a split")
    k.add_argument("--checkpoint", required=True)
    k.add_argument("--triples", required=True)
    k.add_argument("--split", default="test", choices=["train", "valid", "test"])
    k.add_argument("--s3-endpoint", default=None)
    k = kge.add_parser("embed", help="write the unified entity embeddings (entity_id, vector) as Parquet")
    k.add_argument("--checkpoint", required=True)
    k.add_argument("--out", required=True, help="Parquet file URI (local or s3://)")
    k.add_argument("--kb", default=None, metavar="KB_URI",
                   help="keep only this KB's entities and report the KB entities without a vector and the KG "
                        "entities outside the KB")
    k.add_argument("--s3-endpoint", default=None)
    s.set_defaults(func=cmd_kge)

    s = sub.add_parser("evaluate", help="H@1/3/5 and MRR of a checkpoint on a dataset split")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--split", default="test", choices=["train", "dev", "test"])
    s.add_argument("--retrieve", type=int, default=None, metavar="K",
                   help="retrieve K candidates by the separable score, then rerank with the full S_O")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", default=None, help="metrics JSON path (default: CHECKPOINT/eval-SPLIT.json)")
    s.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("index", help="build (or --update) the sharded FAISS entity index on Ray Data")
    s.add_argument("--model", required=True, help="ONNX export dir or checkpoint dir (local or s3://)")
    s.add_argument("--kb", required=True, help="KB Parquet file, directory or glob; with --update, the changed rows "
                   "(a boolean 'deleted' column marks removals)")
    s.add_argument("--out", default=None, help="index URI to create (local dir or s3://)")
    s.add_argument("--update", default=None, metavar="INDEX_URI", help="apply --kb as changes to this index")
    s.add_argument("--shards", type=int, default=1)
    s.add_argument("--factory", default="auto",
                   help="FAISS index factory string: auto (default: SQfp16 / Flat, exact, up to 50k entities per shard, "
                        "else IVF{sqrt(n)},PQ{R/16} with exact re-scoring), or e.g. Flat, HNSW32,SQfp16, IVF4096,PQ76")
    s.add_argument("--feature-dtype", choices=["fp16", "fp32"], default="fp16", help="stored reranking features")
    s.add_argument("--nprobe", type=int, default=32, help="IVF lists scanned per query (IVF factories only)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    _data_job_options(s)
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("link", help="link a corpus (Parquet/JSONL posts or mentions) against an index, on Ray Data")
    s.add_argument("--model", required=True, help="ONNX export dir or checkpoint dir (the index's model)")
    s.add_argument("--index", required=True)
    s.add_argument("--input", required=True, help="Parquet/JSONL file, directory or glob (local or s3://)")
    s.add_argument("--output", required=True, help="output dir (local or s3://): one Parquet file per input file")
    s.add_argument("--top-k", type=int, default=5, help="candidates written per mention")
    s.add_argument("--candidates", type=int, default=20, metavar="K", help="retrieved per shard, then reranked")
    s.add_argument("--nil-threshold", type=float, default=None, help="default: the calibrated value of the model")
    s.add_argument("--kge-embeddings", default=None, metavar="URI",
                   help="collective disambiguation: entity vectors (otmel kge embed) of the KB; each candidate's score "
                        "gains W x its mean cosine to the other mentions' top candidates in the post")
    s.add_argument("--coherence-weight", type=float, default=None, metavar="W",
                   help="W (default: the weight otmel calibrate --kge-embeddings stored for these embeddings)")
    s.add_argument("--detect-mentions", choices=["alias"], default=None,
                   help="find mentions in posts without spans by KB name/alias matching")
    s.add_argument("--context-chars", type=int, default=200, help="context window around a span")
    s.add_argument("--min-alias-length", type=int, default=3)
    s.add_argument("--max-alias-entities", type=int, default=20, help="aliases shared by more entities are not matched")
    s.add_argument("--bad-image", choices=["error", "text"], default="error",
                   help="a given image that cannot be fetched/decoded: error row (default) or link on text")
    s.add_argument("--image-timeout", type=float, default=10.0, help="seconds per image fetch")
    s.add_argument("--force", action="store_true", help="recompute inputs whose output is already complete")
    s.add_argument("--link-actors", default="2", metavar="N|MIN-MAX",
                   help="link-stage actors: batches in flight at the index shard actors")
    s.add_argument("--shard-replicas", type=int, default=1, metavar="R",
                   help="actors per index shard; queries are spread over them (more index throughput)")
    s.add_argument("--shard-gpus", type=float, default=None, metavar="SHARE",
                   help="GPU share of each shard actor (default 0.25 on a GPU cluster, 0 otherwise)")
    s.add_argument("--stall-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="no batch moved for this long (e.g. after a node loss): the pipeline is restarted for the "
                        "files not committed yet, twice at most, then the job fails; 0: wait forever")
    _data_job_options(s)
    s.set_defaults(func=cmd_link)

    s = sub.add_parser("calibrate", help="pick the NIL threshold on a dev split (max linking F1) and store it")
    s.add_argument("--model", required=True, help="ONNX export dir or checkpoint dir (the threshold is stored there)")
    s.add_argument("--index", required=True)
    s.add_argument("--data", required=True, help="dataset dir with kb.parquet and mentions/SPLIT.parquet")
    s.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    s.add_argument("--candidates", type=int, default=20)
    s.add_argument("--kge-embeddings", default=None, metavar="URI",
                   help="also choose the coherence weight for these KGE vectors (otmel kge embed); "
                        "the dev mentions' post_id groups them")
    s.add_argument("--top-k", type=int, default=5, help="with --kge-embeddings: candidates re-ordered per mention "
                                                         "(use the link job's --top-k)")
    s.add_argument("--dry-run", action="store_true", help="print the threshold, store nothing")
    s.add_argument("--s3-endpoint", default=None)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("demo", help="the whole pipeline on a local Ray instance: synth -> train -> export -> index -> link")
    s.add_argument("--out", default="demo-run")
    s.add_argument("--entities", type=int, default=300)
    s.add_argument("--mentions", type=int, default=2400)
    s.add_argument("--mode", default="kd", choices=["ot", "att", "kd"])
    s.add_argument("--epochs", type=int, default=6, help="training epochs")
    s.set_defaults(func=cmd_demo)
    _ops_parsers(sub)
    return p


def cmd_submit(args) -> int:
    from otmel import cluster_ops as ops

    job_id = ops.submit(args.address, args.job_command, args.job_args, args.runtime_env, args.working_dir,
                        args.token_file, args.submission_id)
    return ops.wait_for(args.address, job_id, args.token_file) if args.wait else 0


def cmd_jobs(args) -> int:
    from otmel import cluster_ops as ops

    ops.list_jobs(args.address, args.token_file)
    return 0


def cmd_status(args) -> int:
    from otmel import cluster_ops as ops

    status = ops.job_status(args.address, args.job_id, args.token_file)
    return 1 if status in ("FAILED", "STOPPED") else 0


def cmd_logs(args) -> int:
    from otmel import cluster_ops as ops

    ops.job_logs(args.address, args.job_id, args.follow, args.token_file)
    return 0


def cmd_stop(args) -> int:
    from otmel import cluster_ops as ops

    ops.stop_job(args.address, args.job_id, args.token_file, args.timeout)
    return 0


def cmd_scale(args) -> int:
    from otmel import cluster_ops as ops

    return ops.scale(args.address, args.cpus, args.gpus, args.bundles, args.clear, args.timeout, args.token_file)


def cmd_cluster(args) -> int:
    from otmel import cluster_ops as ops

    if args.action == "local":
        ops.start_local_cluster(args.nodes, args.autoscale, args.max_nodes, args.cpus_per_node, args.dir)
    else:
        ops.stop_local_cluster(args.dir)
    return 0


def _ops_parsers(sub) -> None:
    from otmel.cluster_ops import JOB_COMMANDS

    def common(s, address_help="the head's Jobs API, http://HEAD:8265"):
        s.add_argument("--address", required=True, help=address_help)
        s.add_argument("--token-file", default=None,
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
            s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to stop")
        s.set_defaults(func=func)

    s = sub.add_parser("scale", help="ask the autoscaler for capacity (request_resources) or release it")
    common(s, "the cluster's GCS address, HEAD:6379")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--cpus", type=int, help="at least N CPUs in the cluster (N one-CPU bundles)")
    g.add_argument("--gpus", type=int, help="at least N GPUs (N bundles of 1 GPU + 1 CPU)")
    g.add_argument("--bundles", help='JSON list of resource bundles, e.g. \'[{"GPU": 1, "CPU": 8}]\'')
    g.add_argument("--clear", action="store_true", help="drop the request: idle nodes leave after the idle timeout")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the capacity")
    s.set_defaults(func=cmd_scale)

    s = sub.add_parser("cluster", help="a local multi-node Ray cluster on this machine (token auth on)")
    s.add_argument("action", choices=["local", "down"])
    s.add_argument("--nodes", type=int, default=3, help="nodes including the head (local)")
    s.add_argument("--autoscale", action="store_true", help="let `otmel scale` add nodes up to --max-nodes")
    s.add_argument("--max-nodes", type=int, default=None, help="default: --nodes + 2 with --autoscale")
    s.add_argument("--cpus-per-node", type=int, default=2,
                   help="logical CPUs of each node (Ray Data lists input files in 1-CPU tasks: keep >= 2)")
    s.add_argument("--dir", default=None, help="state directory (default ~/.otmel/local-cluster)")
    s.set_defaults(func=cmd_cluster)


#: errors a user can act on: one line, exit code 2 (anything else is a bug: full traceback)
def _user_errors() -> tuple[type[BaseException], ...]:
    from otmel.cluster_ops import ClusterError
    from otmel.jobs.common import PipelineStalled
    from otmel.storage import StorageError

    return (FileNotFoundError, FileExistsError, ValueError, PermissionError, StorageError, ClusterError,
            PipelineStalled)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except _user_errors() as exc:
        if args.verbose:
            raise
        print(f"otmel {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
