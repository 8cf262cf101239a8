"""File integrity of the artifacts users load: checkpoints, ONNX exports, index shards.

Every artifact directory records each file's size and sha256 when it is written
(``checksums.json`` for checkpoints, the ``files`` table of ``export.json`` for an ONNX
export, ``manifest.json`` for an index); loaders verify the files they open before opening
them, so a truncated copy, a corrupted download or a tampered file (one flipped byte) is
refused with an error naming the file instead of being half-loaded or, worse, trusted.

This detects accidental and single-file changes; it is not a signature: someone who can
rewrite every file of a directory can rewrite its checksums too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: a checkpoint's table of its files' sizes and sha256 (written last)
CHECKSUMS_FILE = "checksums.json"


class IntegrityError(ValueError):
    """A file of an artifact differs from what was recorded when the artifact was written."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(directory: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{name: {"size", "sha256"}}`` of every file directly in ``directory``."""
    d = Path(directory)
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(d.iterdir()) if p.is_file() and p.name not in exclude}


def digest_entry(data: bytes) -> dict:
    """The table entry of a file with these bytes."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def verify_files(directory: str | Path, table: dict[str, dict], names: list[str] | None = None,
                 what: str = "recorded") -> None:
    """Raise :class:`IntegrityError` naming the first file of ``table`` (only ``names`` if
    given) that is missing or differs in size or sha256."""
    d = Path(directory)
    for name in (names if names is not None else sorted(table)):
        want = table.get(name)
        p = d / name
        if want is None:
            raise IntegrityError(f"{p}: not among the files {what}: refusing to load an unverified file")
        if not p.is_file():
            raise IntegrityError(f"{p}: missing (incomplete copy?)")
        size = p.stat().st_size
        if size != want["size"]:
            raise IntegrityError(f"{p}: {size} bytes, {want['size']} {what}: truncated or modified")
        if sha256_file(p) != want["sha256"]:
            raise IntegrityError(f"{p}: sha256 differs from the one {what}: the file was modified or corrupted")


def write_checksums(directory: str | Path) -> dict:
    """Record every file's size and sha256 in ``checksums.json`` (write it last)."""
    d = Path(directory)
    files = file_table(d, exclude=(CHECKSUMS_FILE,))
    (d / CHECKSUMS_FILE).write_text(json.dumps(files, indent=2, sort_keys=True))
    return files


def verify_checksums(directory: str | Path) -> None:
    """Every file recorded in ``checksums.json`` must be there with its size and sha256. A
    directory written before checksums existed is loaded with a warning."""
    d = Path(directory)
    path = d / CHECKSUMS_FILE
    if not path.is_file():
        log.warning("%s has no %s (written by an older otmel): loading it unverified", d, CHECKSUMS_FILE)
        return
    verify_files(d, json.loads(path.read_text()), what=f"recorded in {CHECKSUMS_FILE} at save")
