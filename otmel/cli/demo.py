"""`otmel demo`: the whole pipeline on a local Ray instance."""

from __future__ import annotations

from pathlib import Path

from otmel.cli.common import integer, location, say


def cmd_demo(args) -> int:
    from otmel.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, entities=args.entities, mentions=args.mentions, mode=args.mode, epochs=args.epochs)
    say(f"otmel demo: synth {cfg.entities} entities / {cfg.mentions} mentions -> train (Ray Train, {cfg.workers} "
           f"workers) -> export ONNX -> index ({cfg.shards} shards) -> calibrate NIL -> link the test split (Ray Data)")
    r = run_demo(cfg, progress=say)
    m = r["test_linked"]
    keys = ("H@1", "H@3", "H@5", "MRR")
    say("")
    say(f"linked test split: {m['count']} mentions against {r['entities']} KB entities "
           f"(retrieve K={cfg.candidates} per shard + rerank with S_O)")
    say("  " + " ".join(f"{k:>7}" for k in keys))
    say("  " + " ".join(f"{100 * m[k]:7.2f}" for k in keys))
    say(f"  chance H@1 {100 * r['chance_H@1']:.2f}, name match only {100 * r['same_name_chance_H@1']:.2f}; "
           f"with the NIL threshold {r['nil_threshold']:.3f}: link precision {100 * m['link_precision']:.1f}%, "
           f"recall {100 * m['link_recall']:.1f}%")
    s = r["link_summary"]
    say(f"  link job: {s['counts']['in']} rows, {s['mentions_per_second']} mentions/s ({s['link_seconds']} s)")
    say(f"output Parquet: {r['links']}   index: {r['index']}   model: {r['onnx']}")
    say(f"metrics: {Path(args.out) / 'metrics.json'}   ({r['seconds']:.0f} s: "
           + ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items()) + ")")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("demo", help="the whole pipeline on a local Ray instance: synth -> train -> export -> index -> link")
    s.add_argument("--out", type=location, default="demo-run")
    s.add_argument("--entities", type=integer(1), default=300)
    s.add_argument("--mentions", type=integer(1), default=2400)
    s.add_argument("--mode", default="kd", choices=["ot", "att", "kd"])
    s.add_argument("--epochs", type=integer(1), default=6, help="training epochs")
    s.set_defaults(func=cmd_demo)
