"""Every numeric flag of every command is checked while the command line is parsed: a bad value
(not a number, nan, inf, out of range) exits 2 with one line naming the flag, before Ray starts and
before any file is touched; a good value parses. The table must name every numeric flag the parser
has (a new flag without a row fails here)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

#: command -> the arguments it needs besides the flag under test
REQUIRED = {
    ("synth",): ["--out", "{tmp}/synth"],
    ("train",): ["--data", "{tmp}/data", "--out", "{tmp}/out"],
    ("evaluate",): ["--checkpoint", "{tmp}/ckpt", "--data", "{tmp}/data"],
    ("export",): ["--checkpoint", "{tmp}/ckpt", "--out", "{tmp}/out"],
    ("kge", "train"): ["--triples", "{tmp}/kg", "--out", "{tmp}/out"],
    ("kge", "features"): ["--model", "{tmp}/m", "--kb", "{tmp}/kb.parquet", "--out", "{tmp}/out/f.parquet"],
    ("index",): ["--model", "{tmp}/m", "--kb", "{tmp}/kb.parquet", "--out", "{tmp}/out"],
    ("link",): ["--model", "{tmp}/m", "--index", "{tmp}/i", "--input", "{tmp}/in", "--output", "{tmp}/out"],
    ("calibrate",): ["--model", "{tmp}/m", "--index", "{tmp}/i", "--data", "{tmp}/data"],
    ("demo",): ["--out", "{tmp}/out"],
    ("stop",): ["job-1", "--address", "http://127.0.0.1:9"],
    ("scale",): ["--address", "127.0.0.1:9"],
    ("cluster",): ["local", "--dir", "{tmp}/cluster"],
}
#: flags that need one more argument to make a whole command line (scale asks for one request)
EXTRA = {(("scale",), "--timeout"): ["--clear"]}
#: (command, flag) -> (bad values, a good value)
FLAGS = {
    (("synth",), "--entities"): (["0", "x", "1.5"], "10"),
    (("synth",), "--mentions"): (["0", "-3"], "10"),
    (("synth",), "--seed"): (["-1", "x"], "7"),
    (("synth",), "--missing-image-rate"): (["nan", "-0.1", "1.5", "inf"], "0.4"),
    (("train",), "--workers"): (["0", "two"], "2"),
    (("train",), "--epochs"): (["0", "-1"], "3"),
    (("train",), "--batch-size"): (["0", "1e3"], "16"),
    (("train",), "--lr"): (["0", "nan", "-1e-5", "inf"], "2e-5"),
    (("train",), "--head-lr"): (["0", "nan"], "1e-3"),
    (("train",), "--warmup-steps"): (["-1"], "0"),
    (("train",), "--grad-clip"): (["0", "nan"], "1.0"),
    (("train",), "--text-length"): (["0", "2"], "24"),
    (("train",), "--eval-every"): (["-1"], "0"),
    (("train",), "--eval-retrieve"): (["0"], "10"),
    (("train",), "--max-failures"): (["-2"], "-1"),
    (("train",), "--cpus-per-worker"): (["0", "nan", "-1"], "0.5"),
    (("train",), "--seed"): (["-1"], "0"),
    (("evaluate",), "--retrieve"): (["0"], "10"),
    (("evaluate",), "--batch-size"): (["0"], "64"),
    (("export",), "--opset"): (["0", "6"], "17"),
    (("kge", "train"), "--dim"): (["0", "1"], "32"),
    (("kge", "train"), "--epochs"): (["0"], "5"),
    (("kge", "train"), "--batch-size"): (["0"], "100"),
    (("kge", "train"), "--lr"): (["0", "nan", "-0.1"], "0.1"),
    (("kge", "train"), "--reg"): (["-0.1", "nan"], "0"),
    (("kge", "train"), "--negatives"): (["0"], "8"),
    (("kge", "train"), "--eval-every"): (["-1"], "0"),
    (("kge", "train"), "--seed"): (["-1"], "3"),
    (("kge", "features"), "--batch-size"): (["0"], "64"),
    (("index",), "--shards"): (["0", "-2"], "4"),
    (("index",), "--nprobe"): (["0"], "16"),
    (("index",), "--cpus-per-actor"): (["0", "nan", "-0.25"], "0.25"),
    (("index",), "--batch-size"): (["0"], "64"),
    (("link",), "--top-k"): (["0", "-5"], "5"),
    (("link",), "--candidates"): (["0"], "20"),
    (("link",), "--nil-threshold"): (["nan", "inf", "-inf", "x"], "-0.5"),
    (("link",), "--coherence-weight"): (["-1", "nan"], "0.3"),
    (("link",), "--context-chars"): (["-1"], "0"),
    (("link",), "--min-alias-length"): (["0"], "3"),
    (("link",), "--max-alias-entities"): (["0"], "20"),
    (("link",), "--image-timeout"): (["0", "nan", "-1"], "10"),
    (("link",), "--max-text-bytes"): (["0", "-1", "1.5"], "65536"),
    (("link",), "--max-image-bytes"): (["0", "x"], "1048576"),
    (("link",), "--shard-replicas"): (["0"], "2"),
    (("link",), "--shard-gpus"): (["-0.1", "1.5", "nan"], "0.25"),
    (("link",), "--stall-timeout"): (["-1", "nan", "inf"], "0"),
    (("link",), "--cpus-per-actor"): (["0", "nan"], "1"),
    (("link",), "--batch-size"): (["0", "-64"], "64"),
    (("calibrate",), "--candidates"): (["0"], "20"),
    (("calibrate",), "--top-k"): (["0"], "5"),
    (("demo",), "--entities"): (["0"], "300"),
    (("demo",), "--mentions"): (["0"], "2400"),
    (("demo",), "--epochs"): (["0"], "6"),
    (("stop",), "--timeout"): (["0", "nan", "-5"], "60"),
    (("scale",), "--cpus"): (["0", "-1"], "4"),
    (("scale",), "--gpus"): (["0"], "1"),
    (("scale",), "--timeout"): (["0", "nan"], "600"),
    (("cluster",), "--nodes"): (["0"], "2"),
    (("cluster",), "--max-nodes"): (["0"], "3"),
    (("cluster",), "--cpus-per-node"): (["0"], "2"),
}


@pytest.fixture
def ray_starts(monkeypatch) -> list:
    """Every call that would start or join Ray (``ray.init``, the jobs' ``init_ray``) is recorded
    and refused: a command refused before any work makes none. (``ray.is_initialized`` cannot
    tell: in the whole suite the session's instance is up in this process.)"""
    import ray

    import otmel.jobs.common as common

    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise RuntimeError("Ray was started before the command's checks")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(common, "init_ray", refuse)
    return calls


def _numeric_flags(parser: argparse.ArgumentParser, path: tuple = ()) -> set:
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _numeric_flags(sub, path + (name,))
        elif getattr(action.type, "__name__", "") in ("integer", "number") or action.type in (int, float):
            found.add((path, action.option_strings[-1]))
    return found


def test_the_table_names_every_numeric_flag_and_each_is_checked_by_the_parser():
    from otmel.cli.main import build_parser

    found = _numeric_flags(build_parser())
    assert found == set(FLAGS), (sorted(found - set(FLAGS)), sorted(set(FLAGS) - found))
    # an unchecked numeric type (plain int / float) accepts 0, -1 or nan: none may be left
    assert not [a for a in _all_actions(build_parser()) if a.type in (int, float)]


def _all_actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)
        else:
            yield action


def _argv(command: tuple, flag: str, value: str, tmp) -> list[str]:
    return [*command, *(a.format(tmp=tmp) for a in REQUIRED[command]), *EXTRA.get((command, flag), []),
            f"{flag}={value}"]


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command,flag", sorted(FLAGS))
def test_a_bad_numeric_flag_exits_2_in_one_line_before_any_work(command, flag, tmp_path, capsys, ray_starts):
    from otmel.cli.main import build_parser, main

    # what a job would clean up at its start: an earlier run's output in the output dir
    (tmp_path / "out" / "_staging").mkdir(parents=True)
    (tmp_path / "out" / "_SUCCESS.json").write_text("{}")
    before = _tree(tmp_path)
    bad, good = FLAGS[(command, flag)]
    for value in bad:
        assert main(_argv(command, flag, value, tmp_path)) == 2, (command, flag, value)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and err[0].startswith(f"otmel {' '.join(command)}: error:"), err
    assert not ray_starts and _tree(tmp_path) == before
    args = build_parser().parse_args(_argv(command, flag, good, tmp_path))  # a sound value parses
    parsed = getattr(args, flag.lstrip("-").replace("-", "_"))
    assert parsed == type(parsed)(good)


@pytest.mark.parametrize("field,value", [("nil_threshold", float("nan")), ("nil_threshold", float("inf")),
                                         ("batch_size", 0), ("image_timeout_s", 0.0), ("cpus_per_actor", 0.0),
                                         ("context_chars", -1), ("max_text_bytes", 0)])
def test_a_library_caller_gets_the_same_refusal_from_the_link_config(field, value):
    from otmel.jobs.link import LinkConfig

    with pytest.raises(ValueError, match=f"--{field.removesuffix('_s').replace('_', '-')}"):
        LinkConfig(model="m", index="i", input="x", output="y", **{field: value})


@pytest.mark.parametrize("output", ["{tmp}/in", "{tmp}/in/", "{tmp}/in/out", "{tmp}", "{tmp}/link-to-in/x"])
def test_an_output_that_overlaps_the_input_is_refused_before_any_work(output, tmp_path, capsys, ray_starts):
    """Equal to the input directory (the re-run linked the first run's own parts: every id
    twice), inside it, containing it, or reaching it through a symlink: one line, exit 2,
    nothing touched (not even the earlier run's _SUCCESS.json the job would delete)."""
    from otmel.cli.main import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "posts.jsonl").write_text('{"post_id": "p", "text": "x"}\n')
    (tmp_path / "in" / "_SUCCESS.json").write_text("{}")
    (tmp_path / "link-to-in").symlink_to(tmp_path / "in")
    before = _tree(tmp_path)
    argv = ["link", "--model", str(tmp_path / "m"), "--index", str(tmp_path / "i"), "--input", str(tmp_path / "in"),
            "--output", output.format(tmp=tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output" in err[0] and "the input" in err[0], err
    assert not ray_starts and _tree(tmp_path) == before


@pytest.mark.parametrize("input_uri,output_uri,refused", [
    ("s3://b/posts", "s3://b/posts/out", True), ("s3a://b/posts/", "s3://b/posts", True),
    ("s3://b/posts/*.jsonl", "s3://b/posts", True), ("s3://b/posts/*.jsonl", "s3://b", True),
    ("s3://b/posts", "s3://b/posts-out", False), ("s3://b/in/*.parquet", "s3://b/out", False),
    ("s3://b/posts", "s3://c/posts", False)])
def test_object_store_outputs_are_compared_by_bucket_and_key(input_uri, output_uri, refused):
    from otmel.linking.link_input import check_output_apart

    if refused:
        with pytest.raises(ValueError, match="the input"):
            check_output_apart(input_uri, output_uri)
    else:
        check_output_apart(input_uri, output_uri)


def _mixed_input(root):
    """A dump directory as users have them: two readable files beside files no reader claims,
    files that are not data, and an earlier otmel link output."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"mention_id": ["m"], "mention": ["x"]}), root / "a.parquet")
    (root / "sub" / "b.jsonl").write_text('{"post_id": "p", "text": "x"}\n')
    for name in ("notes.docx", "sheet.xlsx", "paper.pdf", "README"):
        (root / name).write_bytes(b"PK\x03\x04 not an input")
    for name in (".hidden.jsonl", "_SUCCESS", "sub/_staging/x.parquet", "old/part-0123456789abcdef0123.parquet"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not data")


def test_every_input_file_is_read_or_skipped_with_its_reason(tmp_path):
    from otmel.linking.link_input import classify_input_files

    _mixed_input(tmp_path / "in")
    listing = classify_input_files(str(tmp_path / "in"))
    assert listing.files == [str(tmp_path / "in" / "a.parquet"), str(tmp_path / "in" / "sub" / "b.jsonl")]
    why = {str(p.relative_to(tmp_path / "in")): r for p, r in ((Path(f), r) for f, r in listing.skipped.items())}
    assert set(why) == {"notes.docx", "sheet.xlsx", "paper.pdf", "README", ".hidden.jsonl", "_SUCCESS",
                        "sub/_staging/x.parquet", "old/part-0123456789abcdef0123.parquet"}
    assert set(listing.unsupported) == {str(tmp_path / "in" / n) for n in ("notes.docx", "sheet.xlsx", "paper.pdf",
                                                                          "README")}
    assert why["notes.docx"].startswith("unsupported: .docx") and why["README"].startswith("unsupported: no extension")
    assert why["old/part-0123456789abcdef0123.parquet"].startswith("an otmel link output")
    # a glob accounts for what it matches the same way
    glob = classify_input_files(str(tmp_path / "in" / "*"))
    assert glob.files == [str(tmp_path / "in" / "a.parquet")] and str(tmp_path / "in" / "paper.pdf") in glob.unsupported


def test_input_files_no_reader_claims_refuse_the_job_unless_skipped(tmp_path, capsys, ray_starts):
    """20 rows in, 0 out, exit 0 was the old end of a directory of files no reader claimed: now
    the job is refused in one line naming them, before any work; --skip-unsupported links the
    rest (here it gets as far as the missing index)."""
    from otmel.cli.main import main

    _mixed_input(tmp_path / "in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_SUCCESS.json").write_text("{}")
    before = _tree(tmp_path)
    argv = ["link", "--model", str(tmp_path / "m"), "--index", str(tmp_path / "no-index"), "--input",
            str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 file(s)" in err[0] and "no reader" in err[0] and "--skip-unsupported" in err[0], err
    assert "notes.docx" in err[0] and not ray_starts and _tree(tmp_path) == before
    assert main([*argv, "--skip-unsupported"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-index" in err[0] and "no reader" not in err[0], err
