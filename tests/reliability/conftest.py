"""The reliability suite (its own pytest invocation in `make test`): faults applied from
outside to the jobs. Fixtures of tests/conftest.py (synth data, the S3 test endpoint, a
local Ray instance) apply here too; the model is an untrained tiny one (the suite compares
runs with and without faults, it does not judge accuracy)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """The session's local Ray instance, with the dashboard: the suite finds the actors and
    worker processes it kills through Ray's state API."""
    from ray_session import start_local_ray

    yield start_local_ray(tmp_path_factory, include_dashboard=True)
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def model_and_index(ray_local, synth_dir, tmp_path_factory):
    """A tiny random KD model exported to ONNX, and a 2-shard index of the synth KB built
    with it on local disk."""
    import torch

    from otmel.exporters.onnx import ExportConfig, export
    from otmel.factory import TINY, create_model, save_model
    from otmel.jobs.index import IndexConfig
    from otmel.jobs.index import run as build_index
    from otmel.model import ModelConfig
    from otmel.synth import SYNTH_VOCABULARY

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model, pre = create_model(ModelConfig(mode="kd", text_length=24, **TINY), tiny=True, words=SYNTH_VOCABULARY)
    ckpt = save_model(model, pre, root / "ckpt")
    export(ExportConfig(checkpoint=str(ckpt), out=str(root / "onnx"), parity_batches=(4,)))
    build_index(IndexConfig(model=str(root / "onnx"), kb=str(synth_dir / "kb.parquet"), out=str(root / "index"),
                            shards=2))
    return str(root / "onnx"), str(root / "index")
