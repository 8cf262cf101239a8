"""Plant each bug the suite is meant to catch, run the tests that should catch it, restore.

    python tests/planted_bugs.py                 # every plant (~40 min here): a markdown table
    python tests/planted_bugs.py --list          # what would be planted, and the tests
    python tests/planted_bugs.py rerank shuffle  # only the plants whose key contains one of these
    python tests/planted_bugs.py --check         # every plant still applies (its text is in the code)

One row of tests/README.md's table per plant: the property, the tests that prove it, the bug
planted and whether the tests failed. A plant edits shipped code in this checkout (never a
switch in it) and is undone in a ``finally`` whatever happens; run it on a clean checkout
(it refuses a dirty one, so a forgotten restore could not go unnoticed either). A plant whose
text no longer matches the code fails loudly: update the plant with the code it guards.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plant:
    key: str
    prop: str  # the property the tests prove
    bug: str  # the bug, in words
    file: str
    edits: tuple[tuple[str, str], ...]  # (text in the file, exactly once; its replacement)
    tests: tuple[str, ...]


PLANTS = (
    Plant("exactly-once-kills", "Exactly-once link output when encode, link and shard actors are killed mid-job",
          "the commit coordinator keeps a retried batch's part a second time",
          "jobs/link_commit.py",
          (("        if key in parts:\n            self.retried_parts += 1\n            return\n", ""),),
          ("tests/reliability/test_actor_kills.py",
           "tests/test_link_job.py::test_the_commit_tracker_counts_a_retried_part_once_and_refuses_overlapping_rows")),
    Plant("per-file-commit", "A file's output is committed as soon as the file is finished, not at the end",
          "commit every file at the end of the dataset",
          "jobs/link_commit.py",
          (("        if self.have[f] == self.total.get(f):\n            self._start(f)\n", ""),
           ("        incomplete = sorted(self.parts)\n",
            "        for f in [f for f in list(self.parts) if self.have[f] == self.total.get(f)]:\n"
            "            self._start(f)\n        incomplete = sorted(self.parts)\n")),
          ("tests/test_link_job.py::test_a_killed_driver_leaves_only_whole_files_and_the_rerun_completes_them_once",)),
    Plant("link-resume", "A re-run links only the files without a complete output (resume after a killed driver)",
          "resume re-reads finished files (every input treated as not done)",
          "jobs/link_resume.py",
          (("meta = None if cfg.force else is_complete(", "meta = None if True else is_complete("),),
          ("tests/test_link_job.py::test_rerun_skips_complete_outputs_and_forced_rerun_reproduces_them",
           "tests/test_link_job.py::test_a_killed_driver_leaves_only_whole_files_and_the_rerun_completes_them_once")),
    Plant("two-workers", "2 Ray Train workers reach the weights of 1 process on the same global batches",
          "the global negatives are gathered without gradient (dist.all_gather, not the autograd one)",
          "otmel/training/distributed.py",
          (("        return torch.cat(all_gather(x.contiguous()))\n",
            "        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]\n"
            "        dist.all_gather(parts, x.contiguous())\n        return torch.cat(parts)\n"),),
          ("tests/test_distributed.py",
           "tests/test_train_job.py::test_two_workers_train_like_one_process_through_the_job")),
    Plant("global-shuffle", "Every pair is trained once per epoch, in a new global order each epoch",
          "shuffle disabled across epochs (the order ignores the epoch)",
          "otmel/training/loop.py",
          (("np.random.default_rng([seed, epoch]).permutation(n_pairs)", "np.random.default_rng([seed, 0]).permutation(n_pairs)"),),
          ("tests/test_train_job.py::test_every_pair_is_trained_once_per_epoch_in_a_new_order",)),
    Plant("train-restore", "A killed worker's run is restored from S3 and ends with the uninterrupted run's weights",
          "the restore skips the optimizer state (Adam's moments start again)",
          "jobs/train.py",
          (("        opt.load_state_dict(restored[\"optimizer\"][\"optimizer\"])\n", ""),),
          ("tests/test_train_job.py::test_killed_worker_is_restored_from_s3_and_the_run_ends_as_if_uninterrupted",)),
    Plant("checkpoint-interrupted", "Resume skips a checkpoint whose upload was interrupted",
          "the latest checkpoint is taken without checking that its files are all there",
          "jobs/train.py",
          (("        missing = _incomplete_files(fs, files, CHECKSUMS_FILE)\n", "        missing = []\n"),),
          ("tests/test_train_job.py::test_resume_skips_a_checkpoint_whose_upload_was_interrupted",)),
    Plant("onnx-parity", "The ONNX export scores real rows as the PyTorch model does (parity 1e-4)",
          "the export drops the attention mask (every token attended)",
          "exporters/onnx.py",
          (("        f = self.model.encode(input_ids, attention_mask, pixel_values, has_image)",
            "        f = self.model.encode(input_ids, torch.ones_like(attention_mask), pixel_values, has_image)"),),
          ("tests/test_export.py::test_onnx_backend_matches_torch_backend_on_real_rows",)),
    Plant("fp16", "An fp16 export is really converted and within its stated tolerance",
          "the fp16 conversion is skipped (the fp32 graph labelled fp16)",
          "exporters/onnx.py",
          (("OnnxModel(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True))",
            "OnnxModel(onnx.load(str(path)))"),),
          ("tests/test_export.py::test_fp16_export_is_converted_and_close_to_pytorch",)),
    Plant("int8", "An int8 export quantises the matmuls and stays within its stated tolerance",
          "quantisation limited to Gemm (none in the graph: an fp32 copy labelled int8)",
          "exporters/onnx.py",
          (('op_types_to_quantize=["MatMul", "Gemm"]', 'op_types_to_quantize=["Gemm"]'),),
          ("tests/test_export.py::test_int8_export_quantises_the_matmuls_within_its_tolerance",)),
    Plant("rerank", "Reranked scores equal exhaustive scores; top-k follows when it lies in the candidates",
          "the rerank candidates are truncated to a quarter",
          "otmel/linking/linker.py",
          (("        K = min(candidates, self.shard.count)\n", "        K = min(max(1, candidates // 4), self.shard.count)\n"),),
          ("tests/test_link_job.py::test_rerank_scores_equal_exhaustive_scores_and_topk_follows",)),
    Plant("shard-merge", "A sharded, replicated index gives every mention the exhaustive top-k over all entities",
          "the per-shard candidates are merged from the first shard only",
          "otmel/linking/linker.py",
          (("    ids = np.concatenate([p.entity_ids for p in parts], axis=1)\n    scores = np.concatenate([p.scores for p in parts], axis=1)\n",
            "    ids = np.concatenate([p.entity_ids for p in parts[:1]], axis=1)\n    scores = np.concatenate([p.scores for p in parts[:1]], axis=1)\n"),),
          ("tests/test_link_job.py::test_sharded_replicated_index_gives_the_exhaustive_results",)),
    Plant("actors-released", "A job's shard actors and commit coordinator end with it (one Ray instance, jobs in turn)",
          "the shard actors are left to the garbage collector (only the coordinator is killed)",
          "jobs/link.py",
          (("    shard_actors = [a for replicas in shards.actors for a in replicas] if shards else []\n",
            "    shard_actors = []\n"),),
          ("tests/test_link_job.py::test_rerun_skips_complete_outputs_and_forced_rerun_reproduces_them",)),
    Plant("index-update", "`otmel index --update` gives the index a full rebuild gives",
          "the update keeps the old rows of changed entities",
          "jobs/index.py",
          (("keep = np.array([e not in changed for e in ids], dtype=bool)", "keep = np.array([True for e in ids], dtype=bool)"),),
          ("tests/test_index_job.py::test_update_equals_a_full_rebuild_and_leaves_untouched_shards_alone",)),
    Plant("footer-readers", "An index build lists a KB of a few files with one Parquet footer reader, not Ray "
          "Data's 32 (a worker process each)",
          "the footer-reader pool is left at Ray Data's size",
          "jobs/index.py",
          (("    os.environ[FOOTER_READERS_ENV] = str(footer_readers(n_files))\n",
            "    os.environ[FOOTER_READERS_ENV] = str(MAX_FOOTER_READERS)\n"),),
          ("tests/test_index_job.py::test_a_kb_of_a_few_files_is_listed_by_one_footer_reader_and_undecodable_rows_are_skipped_and_counted",)),
    Plant("stall-restart", "A link pipeline that stops moving (a hung encode actor, Ray 2.60 after a node "
          "loss) is restarted for the files not committed; committed files are kept; the output is complete",
          "the job fails on its first stall instead of restarting the pipeline",
          "jobs/link.py",
          (("                        if attempt == PIPELINE_ATTEMPTS:\n                            raise PipelineStalled(",
            "                        if True:\n                            raise PipelineStalled("),),
          ("tests/reliability/test_actor_kills.py::test_a_hung_encode_actor_stalls_the_pipeline_and_the_job_restarts_it_"
           "for_the_uncommitted_files",)),
    Plant("stall-replan", "A restarted link pipeline links only the files the stalled attempt did not commit",
          "the restart links every file of the run again",
          "jobs/link.py",
          (("                        written.update(now_done)\n", "                        pending = todo\n"),),
          ("tests/reliability/test_actor_kills.py::test_a_hung_encode_actor_stalls_the_pipeline_and_the_job_restarts_it_"
           "for_the_uncommitted_files",)),
    Plant("node-loss-index", "A node lost mid-build: the index equals an undisturbed build; rows a retried "
          "routing task sends again are kept once",
          "a shard builder keeps the rows a retried routing task sends again",
          "jobs/index.py",
          (("fresh = [i for i, e in enumerate(entity_ids) if e not in self.seen]",
            "fresh = list(range(len(entity_ids)))"),),
          ("tests/test_index_job.py::test_a_shard_builder_keeps_each_row_once_when_a_retried_routing_task_sends_it_again",
           "tests/reliability/test_node_loss.py::test_a_node_lost_mid_build_and_mid_link_the_jobs_finish_with_the_same_results")),
    Plant("index-driver-memory", "The index driver holds metadata only: its peak RSS is flat in the KB size",
          "the driver collects the encoded features of every batch",
          "jobs/index.py",
          (('            "routed": np.array([json.dumps(routed)], dtype=object)}',
            '            "routed": np.array([json.dumps(routed)], dtype=object), "kept": np.array(['
            '__import__("pickle").dumps({k: batch[k] for k in STORED_FEATURES})], dtype=object)}'),
           ("    seen, skipped, routed = 0, Counter(), Counter()\n",
            "    seen, skipped, routed = 0, Counter(), Counter()\n    kept = []\n"),
           ('        seen += int(meta["rows"].sum())\n', '        seen += int(meta["rows"].sum())\n        kept.extend(meta["kept"])\n')),
          ("tests/test_driver_memory.py::test_index_driver_memory_is_flat_in_the_kb_size",)),
    Plant("hostile-rows", "Hostile rows become error rows with their reason, the rest of the file is linked",
          "a span outside the post text is linked instead of reported",
          "otmel/linking/link_input.py",
          (("or not 0 <= start < end <= len(text)):", "or not 0 <= start):"),),
          ("tests/test_link_job.py::test_bad_rows_become_error_rows_with_their_reason",
           "tests/reliability/test_hostile_corpus.py")),
    Plant("pixel-cap", "Hostile files are contained: a decompression bomb is refused before decoding",
          "the pixel cap is not checked",
          "otmel/io/images.py",
          (("        if width * height > max_pixels:\n", "        if False:\n"),),
          ("tests/reliability/test_hostile_corpus.py::test_the_pixel_cap_refuses_a_bomb_before_decoding",
           "tests/test_image_decoding.py")),
    Plant("decode-small", "A batch of near-cap images is decoded one at a time and shrunk at once: the "
          "preprocessing grows by about one full-size image, not the batch's",
          "images are decoded at full size (the batch holds every full-size image until the resize)",
          "otmel/model/preprocessing.py",
          (("decoded[i] = decode_image(bytes(data), min_edge=self.decode_edge)", "decoded[i] = decode_image(bytes(data))"),),
          ("tests/test_image_decoding.py::test_a_batch_of_near_cap_images_stays_within_a_pixel_budget",)),
    Plant("ssrf", "http(s) images on loopback/private/link-local addresses are refused (SSRF)",
          "the private-address check is skipped",
          "otmel/linking/image_fetch.py",
          (("        if not policy.allow_private_hosts:\n", "        if False:\n"),),
          ("tests/test_image_fetch.py",)),
    Plant("local-paths", "Local image paths are read only under an allowed prefix",
          "the prefix check is skipped",
          "otmel/linking/image_fetch.py",
          (("    if not any(_inside(real, root) for root in roots):\n", "    if False:\n"),),
          ("tests/test_image_fetch.py",)),
    Plant("credentials", "Credentials reach no output, metadata or Ray's job table",
          "AWS credentials are sent in the workers' runtime_env",
          "jobs/common.py",
          (('if (k.startswith("AWS_") and k not in AWS_SECRETS) or k.startswith("OTMEL_")',
            'if k.startswith("AWS_") or k.startswith("OTMEL_")'),),
          ("tests/reliability/test_tampering.py::test_credentials_reach_no_output_metadata_or_job_table",)),
    Plant("checksums", "A checkpoint with one flipped byte is refused, naming the file",
          "checkpoint checksums are not verified on load",
          "otmel/io/integrity.py",
          (('    verify_files(d, json.loads(path.read_text()), what=f"recorded in {CHECKSUMS_FILE} at save")\n', ""),),
          ("tests/reliability/test_tampering.py::test_a_checkpoint_with_one_flipped_byte_is_refused_naming_the_file",
           "tests/reliability/test_tampering.py::test_an_onnx_export_with_one_flipped_byte_is_refused_naming_the_file")),
    Plant("index-tamper", "The link job refuses a tampered index shard in one line",
          "shard files are loaded without their sha256 check",
          "otmel/linking/entity_index.py",
          (("                if not p.is_file() or sha256_file(p) != digest:\n", "                if not p.is_file():\n"),),
          ("tests/reliability/test_tampering.py::test_the_link_job_refuses_a_tampered_index_shard_in_one_line",)),
    Plant("storage-retries", "Transient storage faults are retried; the output equals a healthy run's",
          "no retries (one attempt per S3 call and per transfer)",
          "otmel/io/storage.py",
          (("S3_RETRIES = 8\n", "S3_RETRIES = 1\n"), ("TRANSFER_ATTEMPTS = 3\n", "TRANSFER_ATTEMPTS = 1\n")),
          ("tests/reliability/test_storage_faults.py::test_transient_faults_are_retried_and_the_output_equals_a_healthy_run",)),
    Plant("token-auth", "A cluster refuses a submit without its token or with a wrong one",
          "the local cluster runs without token auth",
          "cluster/local.py",
          (('return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_file}',
            'return {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": self.token_file}'),),
          ("tests/cluster/test_cluster.py::test_a_submit_without_the_token_or_with_a_wrong_one_is_refused",)),
    Plant("scale-down", "`otmel scale` adds nodes a job uses; `--clear` lets them go",
          "--clear leaves the node holds in place",
          "cluster/ops.py",
          (("        released = _release_holds()\n", "        released = 0\n"),),
          ("tests/cluster/test_cluster.py::test_scale_up_then_a_submitted_job_links_to_s3_on_the_new_nodes_and_clear_lets_them_go",)),
    Plant("cluster-session", "The local cluster runs in a session of its own (a submitted job's driver is not "
          "starved beside CPU-bound work in the terminal's session)",
          "`ray start` in the caller's session",
          "cluster/local.py",
          (("capture_output=True, text=True, start_new_session=True)", "capture_output=True, text=True)"),),
          ("tests/cluster/test_cluster.py::test_scale_up_then_a_submitted_job_links_to_s3_on_the_new_nodes_and_clear_lets_them_go",)),
    Plant("cluster-down-own", "`otmel cluster down` stops its own cluster's processes only (another local cluster's "
          "temp dir with a longer name is not its)",
          "the temp dir matched as a substring of the command line",
          "cluster/local.py",
          (("        if names_it.search(cmdline):\n", "        if temp_dir in cmdline:\n"),),
          ("tests/test_cluster_configs.py::test_cluster_down_finds_its_own_processes_only",)),
    Plant("scratch-shards", "A link job on a remote index leaves no local shard copy behind on its nodes",
          "the job's actors are killed without removing their scratch dirs first (ray.kill skips atexit)",
          "jobs/common.py",
          (("    refs = [actor.__ray_call__.options(max_task_retries=0).remote(_remove_scratch_dirs) for actor in actors]\n",
            "    refs = []\n"),),
          ("tests/test_link_job.py::test_a_job_on_a_remote_index_leaves_no_local_shard_copy_behind",)),
    Plant("scratch-builders", "An index build leaves no scratch dir of its shard builders behind",
          "a builder's close removes its shard dir but not its scratch dir, and builders are killed (no atexit)",
          "jobs/index.py",
          (("        shutil.rmtree(self.scratch, ignore_errors=True)\n",
            "        shutil.rmtree(self.writer.directory, ignore_errors=True)\n"),
           ("        end_actors(list(builders.values()))", "        [ray.kill(b) for b in builders.values()]")),
          ("tests/test_index_job.py::test_update_equals_a_full_rebuild_and_leaves_untouched_shards_alone",)),
    Plant("kge-filtered", "KGE filtered ranks equal a brute-force reference over all splits",
          "the filter knows the training triples only",
          "otmel/kge/data.py",
          (("        for arr in self.splits.values():\n            for h, r, t in arr.tolist():\n",
            "        for arr in [self.splits[\"train\"]]:\n            for h, r, t in arr.tolist():\n"),),
          ("tests/test_kge.py::test_filtered_ranks_equal_a_brute_force_reference",)),
    Plant("sinkhorn-pot", "Masked Sinkhorn equals POT's on the unpadded problem; padded entries are exactly 0",
          "the column mask is ignored",
          "otmel/model/ot.py",
          (('    mask_b = _check_mask(mask_b, m, "mask_b")\n', '    mask_b = _check_mask(None, m, "mask_b")\n'),),
          ("tests/test_ot.py::test_matches_pot_masked", "tests/test_ot.py::test_padded_entries_exactly_zero_and_ignored")),
    Plant("layer-rules", "The layers hold: the model imports only itself and io, data never linking or jobs, linking "
          "never jobs or cluster, only the CLI and the demo run jobs (imports inside functions included)",
          "the model's checkpoint loader imports the linker inside the function",
          "otmel/model/factory.py",
          (('    """Load a checkpoint directory written by :func:`save_model` (eval mode)."""\n',
            '    """Load a checkpoint directory written by :func:`save_model` (eval mode)."""\n'
            '    from otmel.linking.linker import merge_topk  # noqa: F401\n'),),
          ("tests/test_layout.py::test_every_import_keeps_the_layer_rules",)),
    Plant("flags-checked", "Every numeric flag of every command is checked while parsing: a bad value exits 2 in "
          "one line naming the flag, before Ray starts or a file is touched",
          "--nil-threshold parsed as a plain float (nan accepted by the parser)",
          "otmel/cli/link.py",
          (('"--nil-threshold", type=real()', '"--nil-threshold", type=float'),),
          ("tests/test_cli_flags.py::test_the_table_names_every_numeric_flag_and_each_is_checked_by_the_parser",)),
    Plant("output-apart", "An output equal to, inside or containing the input is refused before any work",
          "the link job does not compare its output with its input",
          "jobs/link.py",
          (("    check_output_apart(cfg.input, cfg.output)\n", ""),),
          ("tests/test_cli_flags.py::test_an_output_that_overlaps_the_input_is_refused_before_any_work",)),
    Plant("unsupported-files", "Every input file is read or accounted for: files no reader claims refuse the job in "
          "one line (or, with --skip-unsupported, are listed with their reason in _SUCCESS.json)",
          "input files no reader claims are left out silently",
          "jobs/link.py",
          (("    if listing.unsupported and not cfg.skip_unsupported:\n", "    if False:\n"),),
          ("tests/test_cli_flags.py::test_input_files_no_reader_claims_refuse_the_job_unless_skipped",)),
    Plant("output-probe", "An output that cannot be written fails the job before any work (link, index, train)",
          "the link job does not probe its output",
          "jobs/link.py",
          (('    probe_writable(cfg.output, cfg.s3_endpoint, "--output")', '    pass'),),
          ("tests/test_link_job.py::test_an_unwritable_output_fails_before_any_work",)),
    Plant("dry-run", "`otmel link --dry-run` prints each input file's fate and size and starts and writes nothing",
          "the dry run goes on into the job",
          "jobs/link.py",
          (("    if cfg.dry_run:\n        return LinkResult(", "    if False:\n        return LinkResult("),),
          ("tests/test_link_job.py::test_a_dry_run_prints_the_plan_and_starts_and_writes_nothing",)),
    Plant("kb-bad-text", "An index build skips and counts KB rows whose text is not valid UTF-8; the rest is indexed",
          "the KB's text goes to the preprocess step undecoded-checked (the bad-text step dropped)",
          "jobs/index.py",
          (('    ds = ds.map_batches(mark_bad_text, batch_format="pyarrow", batch_size=None, num_cpus=0.25)\n', ""),),
          ("tests/test_index_job.py::test_a_kb_of_a_few_files_is_listed_by_one_footer_reader_and_undecodable_rows_are_"
           "skipped_and_counted",)),
    Plant("rebuild-rows", "The pass that rebuilds a lost shard encodes that shard's KB rows (good ones ok, bad ones "
          "skipped)", "the rebuild's shard filter keeps the other shards' rows",
          "jobs/index.py",
          (('    keep = np.isin(shard_of(batch.column("entity_id").to_pylist(), num_shards), list(shards))\n',
            '    keep = ~np.isin(shard_of(batch.column("entity_id").to_pylist(), num_shards), list(shards))\n'),),
          ("tests/test_index_job.py::test_a_kb_of_a_few_files_is_listed_by_one_footer_reader_and_undecodable_rows_are_"
           "skipped_and_counted",)),
    Plant("no-context", "A mentions row without text is linked on its mention string and flagged no_context "
          "(counted in _SUCCESS.json), or with --require-text an empty_text error row",
          "the reader gives text-less mentions rows no warning",
          "otmel/linking/link_input.py",
          (('"warning": problem or (None if has_text else NO_CONTEXT)', '"warning": problem'),),
          ("tests/test_link_job.py::test_a_mentions_row_without_text_is_flagged_or_with_require_text_an_error_row",
           "tests/test_link_job.py::test_bad_rows_become_error_rows_with_their_reason")),
    Plant("text-cap", "A text over --max-text-bytes is a text_too_long error row (or cut, with --truncate-text), "
          "decided while reading", "the cap is not applied (every text goes on to detection and the tokenizer)",
          "otmel/linking/link_input.py",
          (("        if not isinstance(text, str) or 4 * len(text) <= self.max_bytes:\n",
            "        if True:\n"),),
          ("tests/test_link_job.py::test_a_text_over_the_cap_is_an_error_row_or_cut_and_a_giant_line_is_skipped_as_it_"
           "streams",)),
    Plant("line-bound", "A JSONL line longer than a text and an image at their caps is skipped as it streams by "
          "(one line_too_long row); no process of the job passes 2 GB with a 200 MB line",
          "lines are held whole, however long",
          "otmel/linking/link_input.py",
          (("            elif held + len(piece) > max_line:\n", "            elif False:\n"),),
          ("tests/test_link_job.py::test_a_text_over_the_cap_is_an_error_row_or_cut_and_a_giant_line_is_skipped_as_it_"
           "streams",
           "tests/reliability/test_hostile_corpus.py::test_a_hostile_corpus_comes_back_row_for_row_and_bad_images_"
           "link_on_text")),
    Plant("signals", "SIGTERM and SIGINT stop a link job in one line saying what was kept (exit 143 / 130), no "
          "traceback or C++ dump; the re-run completes it", "the CLI installs no signal handlers",
          "otmel/cli/main.py",
          (("        with stop_on_signals():\n", "        with contextlib.nullcontext():\n"),),
          ("tests/test_link_job.py::test_two_jobs_into_one_output_one_refused_then_sigterm_and_sigint_stop_it_in_one_line_"
           "and_the_rerun_completes",)),
    Plant("signals-after-ray", "A job's signal handlers survive Ray's start",
          "the handlers in place before ray.init are not put back after it",
          "jobs/common.py",
          (("            if handler is not None:\n                signal.signal(s, handler)\n",
            "            pass\n"),),
          ("tests/test_link_job.py::test_two_jobs_into_one_output_one_refused_then_sigterm_and_sigint_stop_it_in_one_line_"
           "and_the_rerun_completes",)),
    Plant("clean-failure", "A failed or interrupted link job removes what it staged for the inputs it did not "
          "commit, and says so; committed files stay", "the staged parts are left behind on failure",
          "jobs/link.py",
          (("                if sys.exc_info()[1] is not None:  # failed or interrupted: its commit tasks died with it\n"
            "                    _remove_staging(cfg)\n", ""),),
          ("tests/reliability/test_storage_faults.py::test_a_permanent_output_failure_is_one_line_nothing_vouches_for_"
           "missing_data_and_no_staging_is_left",)),
    Plant("one-writer", "One writer per output: a second job into an output whose lease is live is refused in one "
          "line before it deletes anything; a stale lease is taken over", "a live lease is taken over as if stale",
          "otmel/io/lease.py",
          (("                if age <= self.stale_s and not _gone(held):\n", "                if False:\n"),),
          ("tests/test_link_job.py::test_one_lease_per_output_a_live_one_refuses_a_second_job_and_a_stale_one_is_taken_"
           "over",
           "tests/test_link_job.py::test_two_jobs_into_one_output_one_refused_then_sigterm_and_sigint_stop_it_in_one_"
           "line_and_the_rerun_completes")),
    Plant("relative-paths", "Every path argument of every command is made absolute against the user's working "
          "directory while parsing, before anything reaches Ray (s3:// untouched)",
          "relative paths are passed on as typed (resolved later, in whatever process opens them)",
          "otmel/cli/common.py",
          (("    return os.path.abspath(os.path.expanduser(text))\n", "    return text\n"),),
          ("tests/test_cli_paths.py",)),
)


def _apply(plant: Plant) -> str:
    """Plant the bug; returns the file's original text (for :func:`_restore`)."""
    path = ROOT / plant.file
    original = text = path.read_text()
    for old, new in plant.edits:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"plant {plant.key}: {plant.file} holds the planted text {n} times (expected once): "
                             f"update the plant with the code\n{old}")
        text = text.replace(old, new)
    path.write_text(text)
    return original


def _restore(plant: Plant, original: str) -> None:
    (ROOT / plant.file).write_text(original)


def run_plant(plant: Plant, timeout: float) -> tuple[str, float, str]:
    """(result, seconds, last line): 'caught' when the tests fail with the bug planted."""
    original = _apply(plant)
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *plant.tests],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        last = lines[-1] if lines else proc.stderr.strip()[-200:]
        result = "caught" if proc.returncode == 1 else ("NOT CAUGHT" if proc.returncode == 0 else f"error rc={proc.returncode}")
    except subprocess.TimeoutExpired:
        last, result = f"timed out after {timeout:.0f} s", "timeout"
    finally:
        _restore(plant, original)
    return result, time.monotonic() - started, last


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("keys", nargs="*", help="run only the plants whose key contains one of these")
    p.add_argument("--list", action="store_true")
    p.add_argument("--check", action="store_true", help="check that every plant applies, run nothing")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    plants = [pl for pl in PLANTS if not args.keys or any(k in pl.key for k in args.keys)]
    if args.list:
        for pl in plants:
            print(f"{pl.key}: {pl.bug} ({pl.file}) -> {' '.join(pl.tests)}")
        return 0
    if args.check:
        for pl in plants:
            _restore(pl, _apply(pl))
        print(f"{len(plants)} plant(s) apply")
        return 0
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        raise SystemExit(f"refusing to plant bugs in a checkout with changes:\n{dirty}")
    print("| property | tests | bug planted | the tests fail |\n|---|---|---|---|", flush=True)
    missed = 0
    for pl in plants:
        result, seconds, last = run_plant(pl, args.timeout)
        missed += result != "caught"
        tests = "<br>".join(f"`{t.removeprefix('tests/')}`" for t in pl.tests)
        verdict = "yes" if result == "caught" else f"**{result}**"
        print(f"| {pl.prop} | {tests} | {pl.bug} (`{pl.file}`) | {verdict} |", flush=True)
        print(f"  {pl.key}: {result} in {seconds:.0f} s: {last}", file=sys.stderr, flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
