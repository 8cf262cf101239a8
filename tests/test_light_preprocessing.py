"""The torch-free preprocessing (otmel.model.light_preprocessing) gives the Hugging Face objects'
exact ids, masks and pixels, and a pickled Preprocessor (what Ray sends to every preprocess
task and training worker) starts in a fresh process without importing torch or
transformers."""

from __future__ import annotations

import io
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from otmel.model.encoders import build_tiny_tokenizer, tiny_image_processor
from otmel.model.preprocessing import Preprocessor
from otmel.data.synth import SYNTH_VOCABULARY

WORDS = list(SYNTH_VOCABULARY) + ["Zürich", "naïve", "日本語", "[SEP]", "robert's", "!!", "x" * 50, "", " ", "washing",
                                  "WAS", "\t", "e\u0301", "😀"]


def _texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 60))) for _ in range(n)]


@pytest.mark.parametrize("length", [8, 24, 40])
def test_the_tokenizer_backend_gives_the_hugging_face_ids_masks_and_truncations(length):
    tokenizer = build_tiny_tokenizer(SYNTH_VOCABULARY)
    pre = Preprocessor(tokenizer, tiny_image_processor(32), text_length=length)
    assert pre.text_backend is not None
    texts = _texts()
    want = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    ids, mask, truncated = pre.tokenize(texts)
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == (len(texts), length)
    assert np.array_equal(ids, want["input_ids"]) and np.array_equal(mask, want["attention_mask"])
    assert truncated == [len(x) > length for x in tokenizer(texts, truncation=False)["input_ids"]]
    assert any(truncated) and not all(truncated)


def _random_images(edge: int, n: int, seed: int = 0) -> list[Image.Image]:
    """Noise (the hardest case for resampling) in every shape around the resize edge: short
    side below, at and above it, tall and wide."""
    rng = np.random.default_rng(seed)
    sizes = [(edge, edge), (edge, 3 * edge), (3 * edge, edge), (edge // 2, edge // 3 + 1)]
    sizes += [(int(rng.integers(edge // 2, 5 * edge)), int(rng.integers(edge // 2, 5 * edge))) for _ in range(n)]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


@pytest.mark.parametrize("edge", [32, 224])
def test_the_clip_image_steps_give_the_hugging_face_processors_pixels_bit_for_bit(edge):
    processor = tiny_image_processor(edge)
    pre = Preprocessor(build_tiny_tokenizer(["a"]), processor, text_length=8)
    assert pre.image_steps is not None
    for image in _random_images(edge, 30):
        want = processor([image], return_tensors="np")["pixel_values"][0]
        got = pre.image_steps(image)
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape == (3, edge, edge)
        assert np.array_equal(got, want), (image.size, float(np.abs(got - want).max()))


def test_a_processor_the_steps_do_not_reproduce_keeps_the_hugging_face_one():
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False,
                                      crop_size={"height": 32, "width": 32})  # a plain square resize
    pre = Preprocessor(build_tiny_tokenizer(["a"]), processor, text_length=8)
    assert pre.image_steps is None
    image = _random_images(32, 1)[1]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    pixels, has_image, _ = pre.images([buf.getvalue()])
    assert has_image.tolist() == [True]
    assert np.array_equal(pixels[0], processor([image], return_tensors="np")["pixel_values"][0])


def test_a_processor_of_another_backend_keeps_its_own_processing_even_with_clips_settings():
    """transformers' default CLIPImageProcessor is the torchvision one where torchvision is
    installed (GPU images): the same settings, other resize arithmetic, so not these steps."""

    class TorchvisionLike:  # the PIL processor's settings, not its backend
        def __init__(self, pil):
            self.__dict__.update(vars(pil))

    processor = TorchvisionLike(tiny_image_processor(32))
    assert processor.do_resize and processor.do_center_crop and processor.size["shortest_edge"] == 32
    assert Preprocessor(build_tiny_tokenizer(["a"]), processor, text_length=8).image_steps is None


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    _random_images(32, 0, seed)[1].save(buf, format="PNG")
    return buf.getvalue()


FRESH_PROCESS = """
import pickle, sys
import numpy as np
pre = pickle.loads(sys.stdin.buffer.read())
batch = pre.mentions({"mention": ["paris", ""], "text": ["robert in paris", "x"], "image": [IMAGE, None]})
np.savez(sys.argv[1], input_ids=batch.input_ids, attention_mask=batch.attention_mask,
         pixel_values=batch.pixel_values, has_image=batch.has_image, ok=batch.ok)
pre.save_pretrained(sys.argv[2])  # what a training worker does for its checkpoint: the files it carries
print(",".join(sorted(m for m in ("torch", "transformers") if m in sys.modules)))
"""


def test_a_pickled_preprocessor_runs_in_a_fresh_process_without_torch_or_transformers(tmp_path):
    pre = Preprocessor(build_tiny_tokenizer(["paris", "robert"]), tiny_image_processor(32), text_length=16)
    image = _png(1)
    code = FRESH_PROCESS.replace("IMAGE", repr(image))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.npz"), str(tmp_path / "saved")],
                          input=pickle.dumps(pre), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().strip() == ""  # neither was imported, not even to save
    got = np.load(tmp_path / "out.npz")
    want = pre.mentions({"mention": ["paris", ""], "text": ["robert in paris", "x"], "image": [image, None]})
    for name in ("input_ids", "attention_mask", "pixel_values", "has_image", "ok"):
        assert np.array_equal(got[name], getattr(want, name)), name
    # what the fresh process saved is what the original saves, and loads back to the same preprocessing
    pre.save_pretrained(tmp_path / "original")
    assert {f.name: f.read_bytes() for f in (tmp_path / "saved").iterdir()} == \
        {f.name: f.read_bytes() for f in (tmp_path / "original").iterdir()}
    again = Preprocessor.from_pretrained(tmp_path / "saved", text_length=16)
    texts = _texts(50, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(again.tokenize(texts)[:2], pre.tokenize(texts)[:2]))


def test_a_checkpoint_saved_by_a_training_worker_carries_the_original_preprocessing_files(tmp_path):
    """A Ray Train worker holds an unpickled Preprocessor: the checkpoint it writes has the
    tokenizer and image-processor files byte for byte as the driver's would be (a reload
    through transformers rewrote tokenizer_config.json with keys of its own)."""
    from conftest import make_model

    from otmel.model.factory import load_model, save_model

    model, pre = make_model()
    save_model(model, pre, tmp_path / "driver")
    save_model(model, pickle.loads(pickle.dumps(pre)), tmp_path / "worker")
    files = {f.name for f in (tmp_path / "driver").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= files
    assert files == {f.name for f in (tmp_path / "worker").iterdir()}
    for name in files - {"model.safetensors", "checksums.json"}:
        assert (tmp_path / "worker" / name).read_bytes() == (tmp_path / "driver" / name).read_bytes(), name
    _, loaded = load_model(tmp_path / "worker")  # checksums verified
    texts = _texts(20, seed=3)
    assert np.array_equal(loaded.tokenize(texts)[0], pre.tokenize(texts)[0])


def test_image_processors_load_with_the_pil_backend_whatever_the_node_has_installed(tmp_path, monkeypatch):
    """transformers 5 loads its torchvision processor wherever torchvision is installed: a
    checkpoint would then preprocess differently on a GPU node than on the driver, and not as
    the light steps do. Every load asks for the PIL backend (this machine has no torchvision,
    so the request itself is what is checked), and gets the light steps."""
    import transformers

    pre = Preprocessor(build_tiny_tokenizer(["a"]), tiny_image_processor(32), text_length=8)
    pre.save_pretrained(tmp_path)
    asked = []
    load = transformers.AutoImageProcessor.from_pretrained
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained",
                        lambda path, **kw: asked.append(kw) or load(path, **kw))
    again = Preprocessor.from_pretrained(tmp_path, text_length=8)
    unpickled = pickle.loads(pickle.dumps(pre))
    assert unpickled.image_processor is not None  # loaded from the files it carries
    assert asked == [{"backend": "pil"}, {"backend": "pil"}]
    assert again.image_steps is not None
