"""ONNX export: parity with PyTorch on both graphs, dynamic axes, OT teacher export, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_model
from otmel.backend import TorchBackend, load_backend
from otmel.exporters.onnx import ExportConfig, ExportError, export
from otmel.model.factory import save_model


@pytest.fixture(scope="module")
def kd_checkpoint(tmp_path_factory):
    model, pre = make_model("kd", missing_image="mask", seed=4)
    return str(save_model(model, pre, tmp_path_factory.mktemp("ckpt") / "kd"))


@pytest.fixture(scope="module")
def kd_export(kd_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "kd"
    meta = export(ExportConfig(checkpoint=kd_checkpoint, out=str(out)))
    return str(out), meta


def test_export_writes_a_self_contained_verified_directory(kd_export):
    from pathlib import Path

    out, meta = kd_export
    files = {p.name for p in Path(out).iterdir()}
    assert {"encoder.onnx", "matcher.onnx", "export.json", "config.json", "tokenizer.json",
            "preprocessor_config.json"} <= files
    saved = json.loads((Path(out) / "export.json").read_text())
    assert saved["export_mode"] == "kd" and saved["assignment"] == "att"
    assert saved["model_version"] and len(saved["model_version"]) == 64
    assert saved["parity_max_abs_diff"] and max(saved["parity_max_abs_diff"].values()) < 1e-4
    assert saved["encoder"]["inputs"]["input_ids"][0] == "batch"
    assert saved["matcher"]["outputs"]["overall"] == ["batch", "candidates"]
    assert {"torch", "onnx", "onnxruntime", "otmel"} <= set(saved["versions"])


@pytest.mark.parametrize("batch,k", [(1, 1), (4, 7), (11, 3)])
def test_onnx_backend_matches_torch_backend_on_real_rows(kd_checkpoint, kd_export, batch, k):
    from conftest import png_bytes

    torch_be = TorchBackend.from_checkpoint(kd_checkpoint)
    onnx_be = load_backend(kd_export[0], threads=1)
    assert onnx_be.kind == "onnx" and onnx_be.model_version == torch_be.model_version
    rows = {"mention": ["robert", "paris", "holland", "watch"] * 3, "text": ["actor france tennis"] * 12,
            "image": [png_bytes(i) if i % 3 else None for i in range(12)]}
    rows = {c: v[:batch] for c, v in rows.items()}
    b = onnx_be.preprocessor.mentions(rows)
    inputs = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "pixel_values": b.pixel_values,
              "has_image": b.has_image}
    ft, fo = torch_be.encode(inputs), onnx_be.encode(inputs)
    for name in ft:
        np.testing.assert_allclose(fo[name], ft[name], atol=1e-4, err_msg=name)
    idx = np.random.default_rng(k).integers(0, batch, (batch, k))
    cands = {n: ft[n][idx] for n in ft}
    st, so = torch_be.score(ft, cands), onnx_be.score(ft, cands)
    for name in st:
        assert so[name].shape == (batch, k)
        np.testing.assert_allclose(so[name], st[name], atol=1e-4, err_msg=name)


def test_ot_mode_export_unrolls_sinkhorn_and_matches(kd_checkpoint, tmp_path):
    meta = export(ExportConfig(checkpoint=kd_checkpoint, out=str(tmp_path / "ot"), mode="ot", parity_batches=(2, 5)))
    assert meta["assignment"] == "ot"
    assert max(meta["parity_max_abs_diff"].values()) < 1e-4
    # the OT teacher and the distilled attention path are different graphs
    kd = export(ExportConfig(checkpoint=kd_checkpoint, out=str(tmp_path / "kd"), parity_batches=(2,)))
    import onnx

    n_ot = len(onnx.load(str(tmp_path / "ot" / "matcher.onnx")).graph.node)
    n_kd = len(onnx.load(str(tmp_path / "kd" / "matcher.onnx")).graph.node)
    assert n_ot > n_kd  # unrolled Sinkhorn iterations
    assert kd["model_version"] == meta["model_version"]


def _real_rows_diff(checkpoint: str, onnx_dir: str) -> tuple[float, float]:
    """Measured by the test itself (not the exporter's figures): max |ONNX - PyTorch| of the
    encoder features and of S_O on real preprocessed rows, some without an image."""
    from conftest import png_bytes

    torch_be, onnx_be = TorchBackend.from_checkpoint(checkpoint), load_backend(onnx_dir, threads=1)
    rows = {"mention": ["robert", "paris", "holland", "watch", "spider", "red"], "text": ["actor france tennis"] * 6,
            "image": [png_bytes(i) if i % 3 else None for i in range(6)]}
    b = onnx_be.preprocessor.mentions(rows)
    inputs = {k: getattr(b, k) for k in ("input_ids", "attention_mask", "pixel_values", "has_image")}
    ft, fo = torch_be.encode(inputs), onnx_be.encode(inputs)
    enc = max(float(np.max(np.abs(fo[n].astype(np.float64) - ft[n]))) for n in ft if ft[n].dtype != bool)
    cands = {n: ft[n][np.random.default_rng(0).integers(0, 6, (6, 4))] for n in ft}
    score = float(np.max(np.abs(onnx_be.score(ft, cands)["overall"] - torch_be.score(ft, cands)["overall"])))
    return enc, score


def _weight_types(path, min_elements: int = 1024) -> set[str]:
    """Element types of the graph's weight matrices (initializers of at least min_elements)."""
    import onnx

    return {onnx.TensorProto.DataType.Name(t.data_type) for t in onnx.load(str(path)).graph.initializer
            if int(np.prod(t.dims)) >= min_elements}


def _op_types(path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_fp16_export_is_converted_and_close_to_pytorch(kd_checkpoint, kd_export, tmp_path):
    from pathlib import Path

    meta = export(ExportConfig(checkpoint=kd_checkpoint, out=str(tmp_path / "h"), fp16=True, parity_batches=(3,)))
    assert meta["precision"] == "fp16" and meta["parity_tolerance"] == 5e-2
    # really converted: the weight matrices are stored as fp16
    assert _weight_types(tmp_path / "h" / "encoder.onnx") == {"FLOAT16"}
    assert _weight_types(Path(kd_export[0]) / "encoder.onnx") == {"FLOAT"}
    enc, score = _real_rows_diff(kd_checkpoint, str(tmp_path / "h"))
    assert 0 < score <= 5e-2 and np.isfinite(enc)  # close, but not the fp32 graph in disguise


def test_int8_export_quantises_the_matmuls_within_its_tolerance(kd_checkpoint, kd_export, tmp_path, capsys):
    import json
    from pathlib import Path

    from otmel.backend import load_backend
    from otmel.cli.main import main

    assert main(["export", "--checkpoint", kd_checkpoint, "--out", str(tmp_path / "q"), "--precision", "int8"]) == 0
    assert "int8" in capsys.readouterr().out
    meta = json.loads((tmp_path / "q" / "export.json").read_text())
    assert meta["precision"] == "int8" and load_backend(str(tmp_path / "q")).precision == "int8"
    assert max(meta["parity_fp32_before_conversion"].values()) < 1e-4
    ops = _op_types(tmp_path / "q" / "encoder.onnx") | _op_types(tmp_path / "q" / "matcher.onnx")
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops  # quantised, not a copy of the fp32 graph
    assert "INT8" in _weight_types(tmp_path / "q" / "encoder.onnx")
    assert _weight_types(Path(kd_export[0]) / "encoder.onnx") == {"FLOAT"}
    enc, score = _real_rows_diff(kd_checkpoint, str(tmp_path / "q"))
    assert 0 < score <= meta["parity_tolerance"]


def test_export_errors_are_one_clear_line_and_leave_nothing(tmp_path):
    from otmel.cli.main import main

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "foreign" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match="cannot load an otmel checkpoint"):
        export(ExportConfig(checkpoint=str(tmp_path / "foreign"), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    model, pre = make_model("att", seed=2)
    save_model(model, pre, tmp_path / "att")
    with pytest.raises(ExportError, match="cannot be exported from a 'att' checkpoint"):
        export(ExportConfig(checkpoint=str(tmp_path / "att"), out=str(tmp_path / "out"), mode="ot"))
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_export_refuses_a_parity_failure(kd_checkpoint, tmp_path, monkeypatch):
    """A graph that disagrees with PyTorch beyond its tolerance is never published: a real
    fp16 conversion measured against a tolerance fp16 cannot meet."""
    from otmel.exporters import onnx as onnx_export

    monkeypatch.setitem(onnx_export.TOLERANCE, "fp16", 1e-7)
    with pytest.raises(ExportError, match=r"ONNX \(fp16\) differs from PyTorch beyond 1e-07"):
        export(ExportConfig(checkpoint=kd_checkpoint, out=str(tmp_path / "bad"), fp16=True, parity_batches=(3,)))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_trained_kd_model_ranks_identically_through_onnx(trained_run, tmp_path):
    """Rankings of the ONNX backend equal the PyTorch backend's on the synth test split."""
    from otmel.data.pairs import load_split

    cfg, result = trained_run
    out = tmp_path / "onnx"
    export(ExportConfig(checkpoint=result.latest_checkpoint, out=str(out), parity_batches=(4,)))
    kb, test = load_split(cfg.data, "test")
    rankings = []
    for be in (TorchBackend.from_checkpoint(result.latest_checkpoint), load_backend(str(out))):
        pre = be.preprocessor
        eb = pre.entities(kb.select(["name", "attributes", "image"]).to_pydict())
        mb = pre.mentions(test.select(["mention", "text", "image"]).to_pydict())
        keys = ("input_ids", "attention_mask", "pixel_values", "has_image")
        ef = be.encode({k: getattr(eb, k) for k in keys})
        mf = be.encode({k: getattr(mb, k) for k in keys})
        M = len(mb)
        grid = {n: np.broadcast_to(v[None], (M, *v.shape)) for n, v in ef.items()}
        scores = be.score(mf, grid)["overall"]  # (M, E)
        rankings.append(np.argsort(-scores, axis=1, kind="stable")[:, :5])
    agree = (rankings[0][:, 0] == rankings[1][:, 0]).mean()
    assert agree == 1.0
    assert (rankings[0] == rankings[1]).mean() > 0.98  # top-5 orders (near-ties may swap)


def test_a_job_driver_opens_the_export_without_its_encoder_and_knows_the_encoders_shapes(kd_export, s3_server,
                                                                                          tmp_path, monkeypatch):
    """The index and link drivers never encode: they get the feature shapes from export.json
    (equal to what one probe row through the encoder gives), do not load encoder.onnx, and
    from S3 do not download it (at ViT-B/32 size ~10 s and ~1 GB of driver RSS per job)."""
    import shutil
    import tempfile
    from pathlib import Path

    from otmel.backend import probe_feature_shapes as probe_model
    from otmel.jobs.common import driver_model
    from otmel.io.storage import upload_dir

    out, _ = kd_export
    probed = probe_model(load_backend(out))
    backend, shapes = driver_model(out)
    assert backend.encoder is None and shapes == probed
    assert shapes["retrieval_key"] == probed["retrieval_key"] and shapes["vision_mask"] != shapes["text_mask"]

    upload_dir(out, "s3://otmel-test/models/driver-kd", s3_server)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    backend, shapes = driver_model("s3://otmel-test/models/driver-kd", s3_server)
    assert backend.encoder is None and shapes == probed
    (copy,) = tmp_path.glob("otmel-model-*")
    assert not (copy / "encoder.onnx").exists() and (copy / "matcher.onnx").is_file()

    # an export whose export.json does not record the encoder's outputs: loaded whole and probed
    old = tmp_path / "older-export"
    shutil.copytree(out, old)
    meta = json.loads((old / "export.json").read_text())
    del meta["encoder"]
    (old / "export.json").write_text(json.dumps(meta))
    backend, shapes = driver_model(str(old))
    assert backend.encoder is not None and shapes == probed
    assert Path(old / "encoder.onnx").is_file()
