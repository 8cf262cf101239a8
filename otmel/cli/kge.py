"""`otmel kge train | features | evaluate | embed`: OTKGE entity embeddings (one process)."""

from __future__ import annotations

import json
import logging
import sys

from otmel.cli.common import integer, location, real, say

log = logging.getLogger(__name__)


def cmd_kge(args) -> int:
    """otmel kge train | features | evaluate | embed: OTKGE entity embeddings (single process)."""
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
    from otmel.io.storage import write_parquet

    model, entities, _ = load_checkpoint(args.checkpoint, args.s3_endpoint)
    table = entity_embeddings(model, entities)
    import pyarrow as pa
    import pyarrow.compute as pc

    coverage = ""
    if args.kb:  # keep the KB's entities; say which of each side the other lacks
        from otmel.io.storage import read_parquet

        kb_ids = set(read_parquet(args.kb, args.s3_endpoint, ["entity_id"]).column("entity_id").to_pylist())
        in_kb = pc.is_in(table.column("entity_id"), value_set=pa.array(sorted(e for e in kb_ids if e is not None),
                                                                      pa.string()))
        kg_only = table.num_rows - pc.sum(in_kb).as_py()
        table = table.filter(in_kb)
        coverage = (f"; {len(kb_ids) - table.num_rows} of {len(kb_ids)} KB entities are not in the KG (no vector: "
                    f"no coherence for them), {kg_only} KG entities are not in the KB (left out)")
    write_parquet(args.out, table, args.s3_endpoint)
    say(f"wrote {table.num_rows} entity embeddings of {table.schema.field('vector').type.list_size} dims to "
           f"{args.out}{coverage}")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("kge", help="OTKGE multimodal KG embeddings: train | features | evaluate | embed")
    kge = s.add_subparsers(dest="kge_command", required=True)
    k = kge.add_parser("train", help="train on KG triples (train/valid/test files); prints the filtered test metrics")
    k.add_argument("--triples", type=location, required=True, help="directory with train, valid, test (head<TAB>relation<TAB>tail)")
    k.add_argument("--out", type=location, required=True, help="checkpoint directory (local or s3://)")
    k.add_argument("--model", default="complex", choices=["complex", "rotate", "transe"])
    k.add_argument("--modalities", default="structure", choices=["structure", "ling", "visual", "all"])
    k.add_argument("--fusion", default="ot", choices=["ot", "mean", "concat"])
    k.add_argument("--features", type=location, default=None, help="*.parquet: entity_id + ling / visual vectors (otmel kge features); or a directory of "
                        "ling.npy / visual.npy whose rows entities.txt names")
    k.add_argument("--entity-map", default=None, help="name<TAB>entity_id lines, when triples use other names")
    k.add_argument("--dim", type=integer(2), default=400, help="reals per entity embedding (ComplEx/RotatE: even)")
    k.add_argument("--epochs", type=integer(1), default=50)
    k.add_argument("--batch-size", type=integer(1), default=1000)
    k.add_argument("--lr", type=real(above=0), default=0.1)
    k.add_argument("--optimizer", default="adagrad", choices=["adagrad", "adam"])
    k.add_argument("--loss", default="ce", choices=["ce", "logistic"],
                   help="ce: 1-N cross-entropy (strong baseline); logistic: the paper's eq. 6 with negatives")
    k.add_argument("--reg", type=real(0), default=0.05, help="N3 regularisation weight")
    k.add_argument("--negatives", type=integer(1), default=64, help="logistic loss: corrupted tails per triple")
    k.add_argument("--eval-every", type=integer(0), default=5, help="epochs between validation MRRs (best kept); 0: none")
    k.add_argument("--seed", type=integer(0), default=0)
    k.add_argument("--s3-endpoint", default=None)
    k = kge.add_parser("features", help="ling / visual entity features from the otmel CLIP encoder over a KB "
                                        "(the --features file of kge train)")
    k.add_argument("--model", type=location, required=True, help="otmel checkpoint or ONNX export dir (local or s3://)")
    k.add_argument("--kb", type=location, required=True, help="KB Parquet: entity_id, name, attributes, image / image_uri")
    k.add_argument("--out", type=location, required=True, help="Parquet file URI: entity_id, ling, visual")
    k.add_argument("--batch-size", type=integer(1), default=64)
    k.add_argument("--allow-image-prefix", action="append", default=None, metavar="DIR",
                   help="local directory whose files image_uri may name (repeatable)")
    k.add_argument("--s3-endpoint", default=None)
    k = kge.add_parser("evaluate", help="filtered MRR and H@1/3/10 of a checkpoint on a split")
    k.add_argument("--checkpoint", type=location, required=True)
    k.add_argument("--triples", type=location, required=True)
    k.add_argument("--split", default="test", choices=["train", "valid", "test"])
    k.add_argument("--s3-endpoint", default=None)
    k = kge.add_parser("embed", help="write the unified entity embeddings (entity_id, vector) as Parquet")
    k.add_argument("--checkpoint", type=location, required=True)
    k.add_argument("--out", type=location, required=True, help="Parquet file URI (local or s3://)")
    k.add_argument("--kb", type=location, default=None, metavar="KB_URI",
                   help="keep only this KB's entities and report the KB entities without a vector and the KG "
                        "entities outside the KB")
    k.add_argument("--s3-endpoint", default=None)
    s.set_defaults(func=cmd_kge)
