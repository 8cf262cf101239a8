"""`otmel synth` and `otmel import-mimic`: datasets to train and evaluate on."""

from __future__ import annotations

from otmel.cli.common import integer, location, real, say


def cmd_synth(args) -> int:
    from otmel.data.synth import write_synthetic_dataset

    report = write_synthetic_dataset(args.out, n_entities=args.entities, n_mentions=args.mentions, seed=args.seed,
                                     missing_image_rate=args.missing_image_rate)
    say(f"wrote synthetic dataset to {args.out}: {report}")
    return 0


def cmd_import_mimic(args) -> int:
    from otmel.data.mimic import import_mimic

    report = import_mimic(args.root, args.dataset, args.out)
    say(f"imported {args.dataset} from {args.root} to {args.out}: {report}")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("synth", help="write a synthetic multimodal dataset (KB + mentions)")
    s.add_argument("--entities", type=integer(1), default=1000)
    s.add_argument("--mentions", type=integer(1), default=5000)
    s.add_argument("--out", type=location, required=True)
    s.add_argument("--seed", type=integer(0), default=0)
    s.add_argument("--missing-image-rate", type=real(0, maximum=1), default=0.4, help="share of KB entities without an image")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("import-mimic", help="convert a MIMIC/MELBench release to an otmel dataset")
    s.add_argument("--root", type=location, required=True)
    s.add_argument("--dataset", required=True, choices=["wikimel", "richpediamel", "wikidiverse"])
    s.add_argument("--out", type=location, required=True)
    s.set_defaults(func=cmd_import_mimic)
