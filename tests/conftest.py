"""Shared fixtures: tiny random OT-MEL models and random input batches (CPU only), and the
session's expensive things, each built once per test run and shared by every test that needs
it: one local Ray instance, one trained tiny checkpoint, its ONNX export, an index on the S3
test endpoint and one on local disk, and the synth mentions linked against it.

Which tests are slow is declared here (:func:`pytest_collection_modifyitems`): every test that
uses the session's Ray (directly or through the fixtures above) or lives in tests/reliability
or tests/cluster; ``make test-fast`` runs the others.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from otmel.model.factory import TINY, create_model
from otmel.model.otmel import ModelConfig

# dummy credentials for the local S3-compatible endpoint, set before any Ray process starts
# so that every Ray actor inherits them (a real cluster uses its nodes' credential chain)
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_REGION", "us-east-1")

# Ray settings of a test session, inherited by every Ray process the tests start (the session's
# instance, the jobs' own drivers and instances, the clusters' nodes). None changes what a
# job computes. Two cut the CPU the suite spends beside its work, on a machine where the suite
# is CPU-bound (a quiet run keeps both cores busy): no metrics collection or usage stats (the
# metrics agents sampled every process of every node), and idle task workers kept for the next
# task of the same job instead of a new process each (a worker starts in ~1-2 s of CPU, most of
# it `import ray.data`). Measured on tests/test_link_job.py: 287 -> 240 CPU-seconds, 161 -> 136 s.
# And Ray's workers at the niceness of every other process: Ray starts them at nice 15, so
# beside any CPU-bound process at nice 0 (another build, another test run: CI's machines are
# shared) they got ~3% of a core each and the suite crawled (under two such processes the
# first test's set-up had not ended after 18 minutes; it takes ~1 minute on a quiet machine).
# Ray Train's controller polls its workers every 0.5 s instead of 2 s (a run's end, a worker's
# death and each step of starting a worker group are seen that much sooner; a tiny run is ~20 s
# of such fixed steps) and starts no preemption watcher (an actor per run, for spot nodes this
# machine has none of): the three training tests that start runs of their own, 127-129 ->
# 102-106 s in same-time runs of tests/test_train_job.py, its CPU unchanged (251-266 vs 256-258 s).
RAY_TEST_SETTINGS = {
    "RAY_worker_niceness": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_num_workers_soft_limit": "10",
    "RAY_idle_worker_killing_time_threshold_ms": "120000",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
for _name, _value in RAY_TEST_SETTINGS.items():
    os.environ.setdefault(_name, _value)

# The tests' own torch work (tiny models trained and evaluated in this process) on one thread.
# With torch's default of one per core, every operator waits for both threads, and beside
# other CPU-bound processes one of them is often preempted: the in-process training tests
# (test_learning, test_kge's fusion test, test_image_decoding) took 197 s instead of 44 s
# beside two such processes, and 69 s on one thread (47 s quiet: a second core gains these
# small operators little). Processes the tests start keep their own settings (Ray Train
# workers: OTMEL_TORCH_THREADS; encode and shard actors: their thread options).
torch.set_num_threads(1)

WORDS = "robert downey holland actor singer paris france tennis watch spider man red blue".split()
TEXT_LENGTH = 16


def make_model(mode: str = "kd", missing_image: str = "zeros", pooling: str = "softpool", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(mode=mode, missing_image=missing_image, pooling=pooling, text_length=TEXT_LENGTH,
                      **{**TINY, **overrides})
    model, pre = create_model(cfg, tiny=True, words=WORDS, image_size=32)
    return model, pre


def random_inputs(n: int, seed: int = 0, image_rate: float = 0.7, vocab: int = 500, text_length: int = TEXT_LENGTH):
    """Random model inputs with varied text lengths (padding) and some image-less rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, text_length + 1, (n,), generator=g)
    ids = torch.randint(2, vocab, (n, text_length), generator=g)
    mask = (torch.arange(text_length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 0  # <|startoftext|>
    ids[torch.arange(n), lengths - 1] = 1  # <|endoftext|> closes the real tokens
    ids = torch.where(mask.bool(), ids, torch.ones_like(ids))  # padding = eos, as CLIP pads
    has_image = torch.rand(n, generator=g) < image_rate
    has_image[0] = True
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "has_image": has_image}


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    from PIL import Image

    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def own_worker_env() -> dict:
    """A runtime env no other worker has: an actor started with it gets a worker process of
    its own, not an idle one that imported something for an earlier test's task."""
    import uuid

    return {"env_vars": {"OTMEL_TEST_OWN_WORKER": uuid.uuid4().hex}}


def scratch_dirs() -> set[str]:
    """The jobs' actors' scratch copies in this machine's temp dir (shards copied from remote
    storage, shards being built, remote models: otmel.io.storage.scratch_dir), not the local
    clusters' Ray dirs (``otmel-ray-PORT``). A job that ended leaves none of its own."""
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("otmel-*") if not p.name.startswith("otmel-ray-")}


#: a test under these directories starts Ray or a cluster of its own
SLOW_DIRECTORIES = ("reliability", "cluster")
#: a test that uses one of these fixtures (directly or through another fixture) runs on Ray
SLOW_FIXTURES = {"ray_local"}


def pytest_collection_modifyitems(config, items):
    """The one place where the fast/slow split is declared (``make test-fast`` = ``-m "not
    slow"``): tests on Ray or in the fault and cluster suites are ``slow``, as are the few
    others marked ``@pytest.mark.slow`` where they are (they train a model in-process)."""
    root = os.path.dirname(__file__)
    for item in items:
        where = os.path.relpath(str(item.path), root).split(os.sep)[0]
        if where in SLOW_DIRECTORIES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def kd_model():
    return make_model("kd")


# ---------------------------------------------------------------------------- session-wide services
SYNTH_ENTITIES = 60
SYNTH_MENTIONS = 400


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic dataset shared by the job tests."""
    from otmel.data.synth import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, n_entities=SYNTH_ENTITIES, n_mentions=SYNTH_MENTIONS, seed=0)
    return out


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray instance for the whole run, without the dashboard (its processes took ~8%
    of a core all along; the fault tests read the GCS's actor table, not the state API)."""
    from ray_session import start_local_ray

    yield start_local_ray(tmp_path_factory)
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP endpoint on 127.0.0.1 (moto), with a bucket ``otmel-test``."""
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="otmel-test")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def trained_run(ray_local, synth_dir, tmp_path_factory):
    """ONE tiny 2-worker KD training run per session (Ray Train start-up costs ~20 s here);
    later tests (export, index, link) reuse its checkpoint. Its pairs are preprocessed in the
    workers (``--preprocess inline``, the CPU default); the one-worker run it is compared with
    goes through Ray Data preprocessing tasks (the GPU default). Not the other way round: with
    2 workers on these 2 cores the tasks' two pipelines cost 61-65 s against 20-21 s inline (1
    worker: 16-18 s against 14 s; tests/README.md)."""
    from otmel.jobs.train import TrainConfig, run

    out = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(data=str(synth_dir), out=str(out), mode="kd", workers=2, epochs=2, batch_size=16, lr=1e-3,
                      tiny_clip=True, name="tiny", model={"text_length": 24}, max_failures=0, preprocess="inline")
    return cfg, run(cfg)


@pytest.fixture(scope="session")
def onnx_model(trained_run, tmp_path_factory):
    """The session's tiny checkpoint exported to ONNX (what the index and link jobs run)."""
    from otmel.exporters.onnx import ExportConfig, export

    _, result = trained_run
    out = tmp_path_factory.mktemp("onnx") / "model"
    export(ExportConfig(checkpoint=result.latest_checkpoint, out=str(out), parity_batches=(4,)))
    return str(out)


@pytest.fixture(scope="session")
def s3_index(ray_local, onnx_model, synth_dir, s3_server):
    """A 2-shard Flat index of the synth KB on the S3 test endpoint (KB read from S3 too)."""
    from otmel.jobs.index import IndexConfig, run
    from otmel.io.storage import write_bytes

    write_bytes("s3://otmel-test/data/kb.parquet", (synth_dir / "kb.parquet").read_bytes(), s3_server)
    cfg = IndexConfig(model=onnx_model, kb="s3://otmel-test/data/kb.parquet", out="s3://otmel-test/index-2",
                      shards=2, s3_endpoint=s3_server, **ONE_ENCODE_ACTOR)
    return cfg, run(cfg)


@pytest.fixture(scope="session")
def local_index(ray_local, onnx_model, synth_dir, tmp_path_factory):
    """A 2-shard index of the synth KB on local disk, built on the session's Ray with the
    session's ONNX export (the fault suite's and the cluster suite's reference index)."""
    from otmel.jobs.index import IndexConfig, run

    out = tmp_path_factory.mktemp("local-index") / "index"
    run(IndexConfig(model=onnx_model, kb=str(synth_dir / "kb.parquet"), out=str(out), shards=2, **ONE_ENCODE_ACTOR))
    return str(out)


#: the pools of a data job whose test is not about them: one encode actor (index, link) and one
#: link-stage actor. Each actor is a process that imports Ray Data and loads its model (~1.2
#: CPU-s before its first batch): a small link job on the session's instance took 12 CPU-s
#: and 6 s with the default pools (2 + 2 here), 7-8 CPU-s and 4 s with these (alternating
#: runs). Pools of several actors are under test where they matter: the main link test
#: (tests/test_link_job.py's ``s3_link``), the killed driver, killed actors, node loss, the
#: driver-memory jobs and the cluster's runs, which also reproduce the one-actor reference rows.
ONE_ACTOR_EACH = {"workers": 1, "link_actors": 1}
ONE_ENCODE_ACTOR = {"workers": ONE_ACTOR_EACH["workers"]}


def cli_options(options: dict) -> list[str]:
    """Config fields as the CLI's options: ``{"link_actors": 1}`` -> ``["--link-actors", "1"]``."""
    return [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]


#: the candidates of the reference link run (and of the runs compared with it)
REFERENCE_CANDIDATES = 32


@pytest.fixture(scope="session")
def reference_link(ray_local, onnx_model, local_index, synth_dir, tmp_path_factory):
    """The synth mentions (train, dev, test) linked against :func:`local_index` on one node,
    the session's local Ray, by one encode and one link-stage actor: what runs on more nodes,
    with more actors, must reproduce row for row."""
    from otmel.jobs.link import LinkConfig, run

    out = tmp_path_factory.mktemp("reference-link") / "out"
    run(LinkConfig(model=onnx_model, index=local_index, input=str(synth_dir / "mentions"), output=str(out),
                   candidates=REFERENCE_CANDIDATES, **ONE_ACTOR_EACH))
    return str(out)


@pytest.fixture(scope="session")
def model_and_index(onnx_model, local_index):
    """The fault suite's model and index (tests/reliability: it compares runs with and without
    faults, it does not judge accuracy): the session's ONNX export and local index."""
    return onnx_model, local_index
