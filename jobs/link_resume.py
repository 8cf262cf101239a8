"""Resume: which input files a link run links (``plan_inputs``). An input whose committed output
was written for this same input, model, index and result settings is done and skipped; a
re-run after a killed driver, or a restarted pipeline attempt, links only the rest."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from otmel.jobs.link import LinkConfig

def settings_hash(cfg: LinkConfig, nil_threshold: float | None, coherence: dict | None = None) -> str:
    settings = dict(cfg.result_settings(), nil_threshold=nil_threshold)
    if coherence is not None:  # the embeddings by content, not by URI
        settings["coherence"] = {"version": coherence["version"], "weight": coherence["weight"]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def plan_inputs(cfg: LinkConfig, files: list[str], model_version: str, index_version: str,
                nil_threshold: float | None,
                coherence: dict | None = None) -> tuple[list[str], dict[str, dict], dict[str, dict]]:
    """Which input files this run links: ``(todo, done, file_meta)``. An input is done when
    its committed output was written for THIS input (same path, size and mtime), model,
    index and result settings (``LinkConfig.result_settings`` + the NIL threshold + the
    coherence embeddings' version and weight), in this version's output format (an output of an
    earlier format is linked again, not mixed into the output directory);
    ``file_meta`` is what each output records to be recognised by a re-run."""
    from otmel.linking.link_input import input_stamps
    from otmel.linking.link_output import is_complete, output_name
    from otmel.io.storage import join

    from otmel.linking.link_output import OUTPUT_FORMAT

    stamps = input_stamps(files, cfg.s3_endpoint)
    expected = {"model_version": model_version, "index_version": index_version,
                "settings": settings_hash(cfg, nil_threshold, coherence), "output_format": OUTPUT_FORMAT}
    file_meta = {f: dict(expected, input=f, input_stamp=stamps[f]) for f in files}
    todo, done = [], {}
    for f in files:
        meta = None if cfg.force else is_complete(join(cfg.output, output_name(f)), file_meta[f], cfg.s3_endpoint)
        if meta is None:
            todo.append(f)
        else:
            done[f] = meta
    return todo, done, file_meta
