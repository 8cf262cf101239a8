"""`otmel link` (Ray Data) and `otmel calibrate` (its NIL threshold and coherence weight)."""

from __future__ import annotations

import logging

from otmel.cli.common import data_job_options, integer, location, real, say

log = logging.getLogger(__name__)


def cmd_link(args) -> int:
    from otmel.jobs.link import LinkConfig, plan_lines, run, summary_line

    cfg = LinkConfig(model=args.model, index=args.index, input=args.input, output=args.output, top_k=args.top_k,
                     candidates=args.candidates, nil_threshold=args.nil_threshold, workers=args.workers,
                     batch_size=args.batch_size, detect_mentions=args.detect_mentions,
                     context_chars=args.context_chars, min_alias_length=args.min_alias_length,
                     max_alias_entities=args.max_alias_entities, bad_image=args.bad_image,
                     require_text=args.require_text, max_text_bytes=args.max_text_bytes,
                     truncate_text=args.truncate_text, max_image_bytes=args.max_image_bytes,
                     allow_image_prefix=args.allow_image_prefix or [], allow_private_hosts=args.allow_private_hosts,
                     image_timeout_s=args.image_timeout, force=args.force,
                     skip_unsupported=args.skip_unsupported, dry_run=args.dry_run, address=args.address,
                     link_actors=args.link_actors, shard_replicas=args.shard_replicas, shard_gpus=args.shard_gpus,
                     gpu=args.gpu, s3_endpoint=args.s3_endpoint, kge_embeddings=args.kge_embeddings,
                     coherence_weight=args.coherence_weight, cpus_per_actor=args.cpus_per_actor,
                     image_transform=args.image_transform, stall_timeout_s=args.stall_timeout)
    result = run(cfg, progress=log.info)
    for line in plan_lines(result.summary) if cfg.dry_run else [summary_line(result)]:
        say(line)
    return 0


def cmd_calibrate(args) -> int:
    from otmel.linking.calibration import CalibrateConfig, calibrate

    cfg = CalibrateConfig(model=args.model, index=args.index, data=args.data, split=args.split,
                          candidates=args.candidates, s3_endpoint=args.s3_endpoint, write=not args.dry_run,
                          kge_embeddings=args.kge_embeddings, top_k=args.top_k)
    r = calibrate(cfg)
    say(f"NIL threshold {r['nil_threshold']:.4f} on {r['mentions']} {args.split} mentions "
           f"({r['nil_gold']} with a gold entity outside the KB): F1 {r['f1']:.4f} (precision {r['precision']:.4f}, "
           f"recall {r['recall']:.4f}) vs F1 {r['f1_no_threshold']:.4f} without a threshold")
    if "coherence" in r:
        c = r["coherence"]
        say(f"coherence weight {c['weight']:.4g}: top-1 accuracy {c['h1']:.4f} vs {c['h1_without']:.4f} without "
               f"({c['posts_with_several_mentions']} posts with several mentions); NIL threshold with it "
               f"{c['nil_threshold']:.4f} (F1 {c['f1']:.4f})")
    say(f"stored in {r['stored_in']}" if r.get("stored_in") else "not stored (--dry-run)")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("link", help="link a corpus (Parquet/JSONL posts or mentions) against an index, on Ray Data")
    s.add_argument("--model", type=location, required=True, help="ONNX export dir or checkpoint dir (the index's model)")
    s.add_argument("--index", type=location, required=True)
    s.add_argument("--input", type=location, required=True, help="Parquet/JSONL file, directory or glob (local or s3://)")
    s.add_argument("--output", type=location, required=True, help="output dir (local or s3://): one Parquet file per input file")
    s.add_argument("--top-k", type=integer(1), default=5, help="candidates written per mention")
    s.add_argument("--candidates", type=integer(1), default=20, metavar="K", help="retrieved per shard, then reranked")
    s.add_argument("--nil-threshold", type=real(), default=None, help="default: the calibrated value of the model")
    s.add_argument("--kge-embeddings", type=location, default=None, metavar="URI",
                   help="collective disambiguation: entity vectors (otmel kge embed) of the KB; each candidate's score "
                        "gains W x its mean cosine to the other mentions' top candidates in the post")
    s.add_argument("--coherence-weight", type=real(0), default=None, metavar="W",
                   help="W (default: the weight otmel calibrate --kge-embeddings stored for these embeddings)")
    s.add_argument("--detect-mentions", choices=["alias"], default=None,
                   help="find mentions in posts without spans by KB name/alias matching")
    s.add_argument("--context-chars", type=integer(0), default=200, help="context window around a span")
    s.add_argument("--min-alias-length", type=integer(1), default=3)
    s.add_argument("--max-alias-entities", type=integer(1), default=20, help="aliases shared by more entities are not matched")
    s.add_argument("--bad-image", choices=["error", "text"], default="error",
                   help="a given image that cannot be fetched/decoded: error row (default) or link on text")
    s.add_argument("--require-text", action="store_true",
                   help="a mentions row without text becomes an error row (empty_text); by default it is linked on its "
                        "mention string alone and flagged (warning no_context, counted in _SUCCESS.json)")
    s.add_argument("--max-text-bytes", type=integer(1), default=1 << 20, metavar="N",
                   help="a longer text (UTF-8 bytes) makes its row a text_too_long error row, decided while reading "
                        "(default 1 MiB); a JSONL line longer than a text and an image at their caps is one "
                        "line_too_long error row")
    s.add_argument("--truncate-text", action="store_true",
                   help="cut a text longer than --max-text-bytes there instead (warning text_truncated)")
    s.add_argument("--max-image-bytes", type=integer(1), default=20 << 20, metavar="N",
                   help="an image (inline or fetched) larger than this is refused for its row (default 20 MiB)")
    s.add_argument("--image-timeout", type=real(above=0), default=10.0, help="seconds per image fetch")
    s.add_argument("--force", action="store_true", help="recompute inputs whose output is already complete")
    s.add_argument("--dry-run", action="store_true",
                   help="check everything, print each input file with what the job would do (link, skip as complete, "
                        "not read and why) and its size, and exit: nothing is started or written")
    s.add_argument("--skip-unsupported", action="store_true",
                   help="link the input files a reader claims and list the others (e.g. .docx, .pdf) in the log and "
                        "_SUCCESS.json (default: refuse the job, naming them)")
    s.add_argument("--link-actors", default="2", metavar="N|MIN-MAX",
                   help="link-stage actors: batches in flight at the index shard actors")
    s.add_argument("--shard-replicas", type=integer(1), default=1, metavar="R",
                   help="actors per index shard; queries are spread over them (more index throughput)")
    s.add_argument("--shard-gpus", type=real(0, maximum=1), default=None, metavar="SHARE",
                   help="GPU share of each shard actor (default 0.25 on a GPU cluster, 0 otherwise)")
    s.add_argument("--stall-timeout", type=real(0), default=600.0, metavar="SECONDS",
                   help="no batch moved for this long (e.g. after a node loss): the pipeline is restarted for the "
                        "files not committed yet, twice at most, then the job fails; 0: wait forever")
    data_job_options(s)
    s.set_defaults(func=cmd_link)

    s = sub.add_parser("calibrate", help="pick the NIL threshold on a dev split (max linking F1) and store it")
    s.add_argument("--model", type=location, required=True, help="ONNX export dir or checkpoint dir (the threshold is stored there)")
    s.add_argument("--index", type=location, required=True)
    s.add_argument("--data", type=location, required=True, help="dataset dir with kb.parquet and mentions/SPLIT.parquet")
    s.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    s.add_argument("--candidates", type=integer(1), default=20)
    s.add_argument("--kge-embeddings", type=location, default=None, metavar="URI",
                   help="also choose the coherence weight for these KGE vectors (otmel kge embed); "
                        "the dev mentions' post_id groups them")
    s.add_argument("--top-k", type=integer(1), default=5, help="with --kge-embeddings: candidates re-ordered per mention "
                                                         "(use the link job's --top-k)")
    s.add_argument("--dry-run", action="store_true", help="print the threshold, store nothing")
    s.add_argument("--s3-endpoint", default=None)
    s.set_defaults(func=cmd_calibrate)
