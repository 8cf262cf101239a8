"""Every core busy on CPU (issue 14): an encode actor's intra-op threads follow the CPUs it
was given; the default fractional share uses its node's cores, split over the pool."""

from __future__ import annotations

from conftest import own_worker_env


def test_threads_follow_the_cpus_given_and_a_fractional_share_splits_the_node():
    from otmel.jobs.common import encode_threads

    assert encode_threads(4, pool_size=1, node_cpus=16) == 4  # --cpus-per-actor 4
    assert encode_threads(1, pool_size=8, node_cpus=16) == 1
    assert encode_threads(0.5, pool_size=1, node_cpus=2) == 2  # the default on this machine
    assert encode_threads(0.5, pool_size=2, node_cpus=2) == 1
    assert encode_threads(0.25, pool_size=3, node_cpus=16) == 5
    assert encode_threads(0.5, pool_size=8, node_cpus=2) == 1  # never 0


def test_the_default_encode_actor_runs_onnx_runtime_on_every_core_without_importing_torch(ray_local, onnx_model):
    """The actor as the jobs start it (0.5 CPU, a pool of 1): its ONNX Runtime sessions run as
    many threads as the node has CPUs (2 here; it used to be 1). With the images transformed
    in the CPU tasks it never imports torch or transformers (their import was ~7 s of CPU of a
    fresh worker's start at ViT-B/32 size); with ``--image-transform device`` its torch
    resize/normalise runs on every core too."""
    import ray

    from otmel.jobs.common import Encode
    from otmel.linking import LINK_MENTION_FEATURES

    def threads(self):
        import sys

        opts = [s.get_session_options().intra_op_num_threads for s in (self.backend.encoder, self.backend.matcher)]
        imported = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
        return self.threads, opts, imported, torch_threads

    node = int(ray.cluster_resources()["CPU"])
    assert node >= 2
    actor = ray.remote(Encode).options(num_cpus=0.5, runtime_env=own_worker_env()).remote(onnx_model, LINK_MENTION_FEATURES, cpus=0.5,
                                                             pool_size=1)
    own, ort_threads, imported, _ = ray.get(actor.__ray_call__.remote(threads))
    ray.kill(actor)
    assert own == node and ort_threads == [node, node]
    assert imported == []

    actor = ray.remote(Encode).options(num_cpus=0.5, runtime_env=own_worker_env()).remote(
        onnx_model, LINK_MENTION_FEATURES, cpus=0.5, pool_size=1, transform="device")
    own, ort_threads, imported, torch_threads = ray.get(actor.__ray_call__.remote(threads))
    ray.kill(actor)
    assert own == torch_threads == node and ort_threads == [node, node] and "torch" in imported
