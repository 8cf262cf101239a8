"""Every core busy on CPU (issue 14): an encode actor's intra-op threads follow the CPUs it
was given; the default fractional share uses its node's cores, split over the pool; the
default pool (``--workers auto``) is one single-thread actor per CPU, or one per GPU, and
preprocessing never runs inside the encode actors."""

from __future__ import annotations

import warnings

import pytest
from conftest import own_worker_env


def test_threads_follow_the_cpus_given_and_a_fractional_share_splits_the_node():
    from otmel.jobs.common import encode_threads

    assert encode_threads(4, pool_size=1, node_cpus=16) == 4  # --cpus-per-actor 4
    assert encode_threads(1, pool_size=8, node_cpus=16) == 1
    assert encode_threads(0.5, pool_size=1, node_cpus=2) == 2  # --workers 1 on this machine
    assert encode_threads(0.25, pool_size=2, node_cpus=2) == 1  # the default (auto) on this machine
    assert encode_threads(0.25, pool_size=3, node_cpus=16) == 5
    assert encode_threads(0.5, pool_size=8, node_cpus=2) == 1  # never 0


def test_the_default_encode_actor_runs_onnx_runtime_on_every_core_without_importing_torch(ray_local, onnx_model):
    """The actor as ``--workers 1`` starts it (0.25 CPU, a pool of 1): its ONNX Runtime sessions
    run as many threads as the node has CPUs (2 here; it used to be 1). With the images transformed
    in the CPU tasks it never imports torch or transformers (their import was ~7 s of CPU of a
    fresh worker's start at ViT-B/32 size); with ``--image-transform device`` its torch
    resize/normalise runs on every core too."""
    import ray

    from otmel.jobs.common import Encode
    from otmel.linking.linker import LINK_MENTION_FEATURES

    def threads(self):
        import sys

        opts = [s.get_session_options().intra_op_num_threads for s in (self.backend.encoder, self.backend.matcher)]
        imported = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
        return self.threads, opts, imported, torch_threads

    node = int(ray.cluster_resources()["CPU"])
    assert node >= 2
    actor = ray.remote(Encode).options(num_cpus=0.25, runtime_env=own_worker_env()).remote(
        onnx_model, LINK_MENTION_FEATURES, cpus=0.25, pool_size=1)
    own, ort_threads, imported, _ = ray.get(actor.__ray_call__.remote(threads))
    ray.kill(actor)
    assert own == node and ort_threads == [node, node]
    assert imported == []

    actor = ray.remote(Encode).options(num_cpus=0.25, runtime_env=own_worker_env()).remote(
        onnx_model, LINK_MENTION_FEATURES, cpus=0.25, pool_size=1, transform="device")
    own, ort_threads, imported, torch_threads = ray.get(actor.__ray_call__.remote(threads))
    ray.kill(actor)
    assert own == torch_threads == node and ort_threads == [node, node] and "torch" in imported


def test_the_default_pool_is_one_single_thread_actor_per_cpu_or_one_per_gpu(ray_local, monkeypatch):
    import ray

    from otmel.jobs import common
    from otmel.jobs.common import encode_pool, encode_threads, parse_pool

    cpus = int(ray.cluster_resources()["CPU"])
    assert encode_pool("auto", use_gpu=False) == str(cpus)  # 2 here
    assert encode_threads(0.25, int(encode_pool("auto", use_gpu=False)), cpus) == 1
    assert encode_pool("auto", use_gpu=True) == "1"  # --gpu before any GPU node is up: one actor to start with
    assert encode_pool("3", use_gpu=False) == "3" and encode_pool("2-8", use_gpu=True) == "2-8"  # given: as given
    # many cores, little memory: at most one actor per ENCODE_ACTOR_MEMORY of Ray memory
    monkeypatch.setattr(common, "ENCODE_ACTOR_MEMORY", int(ray.cluster_resources()["memory"]) // 2 + 1)  # room for 1
    assert encode_pool("auto", use_gpu=False) == "1"
    with pytest.raises(ValueError, match="--workers must be auto, N or MIN-MAX"):
        parse_pool("autox", allow_auto=True)
    with pytest.raises(ValueError, match="--workers must be N or MIN-MAX"):
        parse_pool("auto")  # other pools (--link-actors) have no auto


@pytest.mark.parametrize("job", ["link", "index"])
def test_preprocessing_stays_out_of_the_encode_actors_whatever_cpus_they_get(ray_local, onnx_model, synth_dir, job,
                                                                             capsys):
    """Ray Data fuses a task step into the actor step after it when their remote args are
    equal: with ``--cpus-per-actor`` equal to the preprocess tasks' CPUs (0.25, the default)
    the encode actors would tokenise and decode images between batches, on the encoder's
    cores. The optimised physical plan keeps preprocessing as tasks of its own, and the
    remote arg that keeps them apart puts no deprecation warning in the job's log."""
    from otmel.backend import load_backend

    pre = load_backend(onnx_model, encoder=False).preprocessor
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pytest's own filters would hide what a job's log shows
        ds = _encoded(job, onnx_model, synth_dir, pre)
    # max_restarts is passed the only way Ray 2.60 has, which it calls deprecated: not in the log
    assert not [w for w in caught if "ray_remote_args" in str(w.message)], [str(w.message) for w in caught]
    ds.explain()
    optimised = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    operators = [line.strip("+- ").strip() for line in optimised.splitlines() if "Operator[" in line]
    preprocess = f"preprocess_{'mentions' if job == 'link' else 'entities'}"
    assert "ActorPoolMapOperator[MapBatches(Encode)]" in operators, operators
    assert any(op.startswith("TaskPoolMapOperator[") and op.endswith(f"MapBatches({preprocess})]")
               for op in operators), operators


def _encoded(job: str, onnx_model: str, synth_dir, pre):
    from otmel.jobs.link_pipeline import PREPROCESS_CPUS

    if job == "link":
        from otmel.jobs.link import LinkConfig
        from otmel.jobs.link_pipeline import encoded_mentions

        cfg = LinkConfig(model=onnx_model, index="unused", input="unused", output="unused",
                         cpus_per_actor=PREPROCESS_CPUS, workers=2)
        return encoded_mentions(cfg, [str(synth_dir / "mentions" / "test.parquet")], pre, None, False)
    else:
        from otmel.jobs.index import IndexConfig, encoded_entities

        cfg = IndexConfig(model=onnx_model, kb=str(synth_dir / "kb.parquet"), out="unused",
                          cpus_per_actor=PREPROCESS_CPUS, workers=2)
        return encoded_entities(cfg, [str(synth_dir / "kb.parquet")], pre, False)
