"""otmel kge features: OTKGE's linguistic and visual entity features from the otmel CLIP
encoder over the KB, and kge train fusing them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def test_kb_features_from_the_clip_encoder_feed_kge_training(onnx_model, synth_dir, tmp_path, capsys):
    from otmel.backend import load_backend
    from otmel.cli.main import main
    from otmel.model.preprocessing import MODEL_INPUTS
    from otmel.data.synth_posts import write_related_posts

    kb = pq.read_table(synth_dir / "kb.parquet")
    # one row without an id and one with an image that cannot be fetched: counted, not fatal
    extra = pa.table({"entity_id": [None, "Qnoimg"], "name": ["x y", "lone wolf"], "attributes": ["", "sport chess."],
                      "image": [None, None], "image_uri": [None, str(tmp_path / "missing.png")],
                      "aliases": [None, None]}, schema=kb.schema)
    pq.write_table(pa.concat_tables([kb, extra]), tmp_path / "kb.parquet")
    out = tmp_path / "features.parquet"
    assert main(["kge", "features", "--model", onnx_model, "--kb", str(tmp_path / "kb.parquet"), "--out", str(out),
                 "--batch-size", "16", "--allow-image-prefix", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    feats = pq.read_table(out)
    assert report["entities"] == feats.num_rows == kb.num_rows + 1
    assert report["skipped"] == {"missing_id": 1} and report["bad_images"] == {"bad_image": 1}
    rows = {r["entity_id"]: r for r in feats.to_pylist()}
    has_image = {e: img is not None for e, img in zip(kb.column("entity_id").to_pylist(), kb.column("image").to_pylist())}
    assert all((rows[e]["visual"] is not None) == h for e, h in has_image.items())
    assert rows["Qnoimg"]["visual"] is None and report["without_image"] == sum(not h for h in has_image.values()) + 1
    # the vectors are the encoder's text / image summaries of the KB rows
    backend = load_backend(onnx_model)
    first = kb.slice(0, 4).to_pydict()
    batch = backend.preprocessor.entities(first)
    ref = backend.encode({k: getattr(batch, k) for k in MODEL_INPUTS}, ("text_summary", "vision_summary"))
    for i, e in enumerate(first["entity_id"]):
        assert np.allclose(rows[e]["ling"], ref["text_summary"][i], atol=1e-5)
        if has_image[e]:
            assert np.allclose(rows[e]["visual"], ref["vision_summary"][i], atol=1e-5)
    assert len(rows[first["entity_id"][0]]["ling"]) == report["ling_dim"] > 0

    # kge train fuses them (team nodes of the KG have no KB row: zeros, counted)
    write_related_posts(synth_dir / "kb.parquet", tmp_path / "kg", n_posts=4)
    assert main(["kge", "train", "--triples", str(tmp_path / "kg" / "triples"), "--features", str(out),
                 "--modalities", "all", "--fusion", "ot", "--out", str(tmp_path / "ckpt"), "--dim", "16",
                 "--epochs", "3", "--eval-every", "0"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < metrics["mrr"] <= 1
    lambdas = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())["lambdas"]
    assert set(lambdas) == {"structure", "ling", "visual"}
