"""`otmel index`: build or update the sharded FAISS entity index (Ray Data)."""

from __future__ import annotations

from otmel.cli.common import data_job_options, integer, location, say


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
    say(summary_line(run(cfg)))
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("index", help="build (or --update) the sharded FAISS entity index on Ray Data")
    s.add_argument("--model", type=location, required=True, help="ONNX export dir or checkpoint dir (local or s3://)")
    s.add_argument("--kb", type=location, required=True, help="KB Parquet file, directory or glob; with --update, the changed rows "
                   "(a boolean 'deleted' column marks removals)")
    s.add_argument("--out", type=location, default=None, help="index URI to create (local dir or s3://)")
    s.add_argument("--update", type=location, default=None, metavar="INDEX_URI", help="apply --kb as changes to this index")
    s.add_argument("--shards", type=integer(1), default=1)
    s.add_argument("--factory", default="auto",
                   help="FAISS index factory string: auto (default: SQfp16 / Flat, exact, up to 50k entities per shard, "
                        "else IVF{sqrt(n)},PQ{R/16} with exact re-scoring), or e.g. Flat, HNSW32,SQfp16, IVF4096,PQ76")
    s.add_argument("--feature-dtype", choices=["fp16", "fp32"], default="fp16", help="stored reranking features")
    s.add_argument("--nprobe", type=integer(1), default=32, help="IVF lists scanned per query (IVF factories only)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    data_job_options(s)
    s.set_defaults(func=cmd_index)
