"""--image-transform device: the encoder resizes and normalises the decoded images (its GPU on
a cluster; here the same torch code on the CPU) and gets the CPU path's pixel tensors within
DEVICE_PIXEL_TOLERANCE (1 of 255 grey levels)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ONE_ACTOR_EACH
from PIL import Image

from otmel.model.encoders import tiny_image_processor
from otmel.model.pixels import DEVICE_PIXEL_TOLERANCE, PixelTransform
from otmel.model.preprocessing import Preprocessor


def _image(width: int, height: int, fmt: str, seed: int, noise: int = 30, mode: str = "RGB") -> bytes:
    """A smooth random picture with pixel noise (bicubic overshoots on it: what PIL clips)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((max(2, height // 16), max(2, width // 16), 3)) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(base + rng.integers(-noise, noise + 1, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    if mode == "RGBA":
        img.putalpha(Image.fromarray((rng.random((height, width)) * 255).astype(np.uint8)))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


#: wide and tall, decoded at a reduced JPEG scale or box-reduced, up- and down-sampled, an odd
#: crop offset, transparency, the size that needs no resize, a missing image
IMAGES = [(640, 480, "JPEG"), (480, 640, "JPEG"), (1920, 1080, "JPEG"), (2500, 300, "PNG"), (301, 207, "PNG"),
          (150, 100, "JPEG"), (224, 224, "PNG"), (97, 300, "PNG"), (700, 701, "PNG")]


@pytest.mark.parametrize("edge", [224, 32])
def test_the_device_transform_gives_the_cpu_paths_pixels_within_one_grey_level(edge):
    from otmel.model.encoders import build_tiny_tokenizer

    pre = Preprocessor(build_tiny_tokenizer(["a"]), tiny_image_processor(edge), text_length=8)
    data = [_image(w, h, fmt, seed) for seed, (w, h, fmt) in enumerate(IMAGES)]
    data.append(_image(400, 300, "PNG", 99, mode="RGBA"))
    data.append(None)
    cpu, has_cpu, warn_cpu = pre.images(data)
    arrays, has_dev, warn_dev = pre.image_arrays(data)
    assert list(has_cpu) == list(has_dev) == [True] * (len(data) - 1) + [False] and warn_cpu == warn_dev
    assert arrays[-1].size == 0 and all(a.dtype == np.uint8 and a.ndim == 3 for a in arrays)
    device = PixelTransform(pre.image_steps, "cpu")(arrays)
    assert device.shape == cpu.shape == (len(data), 3, edge, edge) and device.dtype == np.float32
    diff = np.abs(device - cpu).max(axis=(1, 2, 3))
    assert diff.max() <= DEVICE_PIXEL_TOLERANCE, dict(zip(IMAGES, diff.round(3)))
    assert not device[-1].any()  # no image: zeros, as on the CPU path


def test_a_processor_the_device_path_does_not_reproduce_is_refused():
    from transformers import CLIPImageProcessorPil

    from otmel.model.encoders import build_tiny_tokenizer

    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      do_center_crop=False)
    with pytest.raises(ValueError, match="image-transform cpu"):
        PixelTransform(Preprocessor(build_tiny_tokenizer(["a"]), processor, text_length=8).image_steps)


def test_a_link_job_with_the_device_transform_gives_the_cpu_paths_links(ray_local, onnx_model, s3_index, synth_dir,
                                                                        tmp_path, s3_server):
    """Mentions with photo-sized images linked twice, resized on the CPU tasks and in the
    encode actor: the same links and candidates, scores within float noise of the pixels'
    1-grey-level differences (and not bit-identical: the encoder did the resizing)."""
    from otmel.jobs.link import LinkConfig, run
    from otmel.linking.link_output import read_link_output

    test = pq.read_table(synth_dir / "mentions" / "test.parquet").slice(0, 40)
    photos = [_image(160 + 7 * i, 120 + 5 * i, "JPEG" if i % 2 else "PNG", i, noise=10) for i in range(test.num_rows)]
    test = test.set_column(test.column_names.index("image"), "image", pa.array(photos, pa.binary()))
    (tmp_path / "in").mkdir()
    pq.write_table(test, tmp_path / "in" / "m.parquet")
    out = {}
    for transform in ("cpu", "device"):
        cfg = LinkConfig(model=onnx_model, index=s3_index[0].out, input=str(tmp_path / "in"),
                         output=str(tmp_path / transform), top_k=5, image_transform=transform, s3_endpoint=s3_server,
                         **ONE_ACTOR_EACH)
        run(cfg)
        out[transform] = read_link_output(cfg.output).to_pylist()
    cpu, dev = out["cpu"], out["device"]
    assert [r["mention_id"] for r in cpu] == [r["mention_id"] for r in dev] and all(r["status"] == "ok" for r in cpu)
    assert [r["entity_id"] for r in cpu] == [r["entity_id"] for r in dev]
    gaps = [abs(a["score"] - b["score"]) for a, b in zip(cpu, dev)]
    assert 0 < max(gaps) < 1e-2, max(gaps)


def test_the_cli_passes_the_encoder_options_to_both_data_jobs(monkeypatch, tmp_path):
    import otmel.jobs.index as index_job
    import otmel.jobs.link as link_job
    from otmel.cli.main import main

    seen = {}

    def capture(cfg, progress=None):
        seen[type(cfg).__name__] = cfg
        raise ValueError("captured")

    monkeypatch.setattr(index_job, "run", capture)
    monkeypatch.setattr(link_job, "run", capture)
    opts = ["--image-transform", "device", "--cpus-per-actor", "4", "--workers", "2-8"]
    assert main(["index", "--model", "m", "--kb", "k", "--out", str(tmp_path / "i"), *opts]) == 2
    assert main(["link", "--model", "m", "--index", "i", "--input", "x", "--output", "y", *opts]) == 2
    for name in ("IndexConfig", "LinkConfig"):
        cfg = seen[name]
        assert (cfg.image_transform, cfg.cpus_per_actor, cfg.workers) == ("device", 4.0, "2-8"), name
