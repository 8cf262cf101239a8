"""Every path argument of every command is made absolute against the working directory the
command was typed in, while the command line is parsed (``s3://`` and other URIs untouched):
before any config is built or sent to Ray, whose workers run elsewhere (``otmel train --data
data`` failed inside the Ray Train workers with ``data/kb.parquet: no such file``)."""

from __future__ import annotations

import argparse
import os

from otmel.cli.common import location, model_location
from otmel.cli.main import build_parser

#: options that name a file, a directory or a glob (a new one must be added here and given
#: ``type=location``; ``kge train --model`` is a model kind, not a path)
PATH_OPTIONS = {"--data", "--out", "--model", "--index", "--input", "--output", "--kb", "--checkpoint",
                "--kge-embeddings", "--update", "--root", "--dir", "--token-file", "--triples", "--features"}


def _commands(parser: argparse.ArgumentParser, prefix: tuple = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _commands(sub, prefix + (name,))


def test_every_path_option_of_every_command_is_made_absolute_while_parsing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checked = set()
    for command, sub in _commands(build_parser()):
        for action in sub._actions:
            flag = next((o for o in action.option_strings if o.startswith("--")), None)
            if flag not in PATH_OPTIONS or action.choices:
                continue
            assert action.type is location, f"otmel {' '.join(command)} {flag}: not resolved while parsing"
            checked.add((command, flag))
    assert len(checked) >= 42, sorted(checked)
    # what the type does: local paths (globs, ~ too) against the working directory; URIs as given
    assert location("data") == str(tmp_path / "data")
    assert location("runs/../data/*.parquet") == str(tmp_path / "data" / "*.parquet")
    assert location("~/kb") == os.path.expanduser("~/kb")
    assert location("/abs/kb") == "/abs/kb"
    assert location("s3://bucket/data") == "s3://bucket/data"
    (tmp_path / "clip-dir").mkdir()
    assert model_location("clip-dir") == str(tmp_path / "clip-dir")
    assert model_location("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"  # a hub name


def test_a_relative_command_line_reaches_the_job_config_absolute(tmp_path, monkeypatch):
    """The train command as a newcomer types it, from their own directory: the config the CLI
    would send to Ray holds absolute paths (the job is not run)."""
    from otmel.cli.train import train_config

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["train", "--data", "data", "--out", "run", "--mode", "kd", "--workers", "2",
                                      "--tiny-clip", "--epochs", "1"])
    cfg = train_config(args)
    assert cfg.data == str(tmp_path / "data") and cfg.out == str(tmp_path / "run")
    args = build_parser().parse_args(["link", "--model", "m", "--index", "s3://b/i", "--input", "in/*.jsonl",
                                      "--output", "out"])
    assert (args.model, args.index, args.input, args.output) == (
        str(tmp_path / "m"), "s3://b/i", str(tmp_path / "in" / "*.jsonl"), str(tmp_path / "out"))
