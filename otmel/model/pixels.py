"""CLIP's pixel processing in torch, on the encoder's device (``--image-transform device``).

The CPU path (``otmel.model.preprocessing.Preprocessor.images``) decodes each image small and runs
CLIP's image steps as the checkpoint's Hugging Face (PIL) image processor does them
(``otmel.model.light_preprocessing.ClipImageSteps``, the same bits): resize the shortest edge to
``S`` (PIL, bicubic), centre crop ``S x S``, rescale to [0, 1], normalise with CLIP's mean and
std. At ViT-B/32 size those steps are most of a preprocessing task's time (a 640x480 JPEG: ~2.6 ms
to decode, ~5.8 ms to resize and normalise on one core), so a GPU encoder needs 20+ cores of
preprocessing to keep up. The device path keeps only the decode on the CPU: the preprocess
task sends the decoded uint8 pixels (cut and reduced as ``otmel.io.images.decode_image`` does),
and :class:`PixelTransform` does the rest where the encoder runs (the GPU; on a CPU node the
same torch code on the CPU).

It follows the processor step for step: the same output size (``int(S * long / short)`` on
the long side), the same crop offsets (``(h - S) // 2``), bicubic resampling with PIL's kernel
(torch's antialiased bicubic uses PIL's a = -0.5 and its support scaling), in PIL's two passes
(horizontal, then vertical), each rounded and clipped to 8 bits as PIL's intermediate image
is. A single float pass differed by up to 9 grey levels on noisy images (bicubic overshoot that
PIL clips between its passes); the two passes agree with PIL to within 1 grey level
(:data:`DEVICE_PIXEL_TOLERANCE` in normalised units; measured on 150 random JPEG/PNG images of
100-2,500 px; ``tests/test_image_transform.py``). The decode is the CPU path's (the same
reduced size): decoding smaller still (JPEG at half the DCT scale) moved pixels by up to 0.27.
"""

from __future__ import annotations

import numpy as np

#: the largest |device - CPU| of a normalised pixel value the tests allow: 1 of 255 grey levels
#: (1 / 255 / CLIP's smallest std, 0.2613 = 0.015), with a little room for float rounding
DEVICE_PIXEL_TOLERANCE = 0.02
#: an empty image (a row without one) in the uint8 column the preprocess step sends
NO_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)


class PixelTransform:
    """resize shortest edge -> centre crop -> rescale -> normalise, in torch on ``device``.

    Built from the preprocessor's image steps (:class:`otmel.model.light_preprocessing.ClipImageSteps`,
    CLIP's, read from a PIL-backend image processor: ``size.shortest_edge``, ``crop_size``,
    ``rescale_factor``, ``image_mean`` / ``image_std``); a preprocessor without them (a
    processor doing something else), another resampling filter or a non-square crop is
    refused (use the CPU path).
    """

    def __init__(self, steps, device: str = "cpu"):
        import torch

        from otmel.model.light_preprocessing import BICUBIC

        if steps is None or steps.resample != BICUBIC or steps.crop[0] != steps.crop[1]:
            raise ValueError("--image-transform device reproduces CLIP's processing only (resize the shortest edge "
                             "bicubic, centre crop); this model's image processor differs: use --image-transform cpu")
        self.steps = steps
        self.crop = steps.crop[0]
        self.device = torch.device(device)
        scale = 1.0 if steps.rescale_factor is None else steps.rescale_factor
        mean = np.zeros(3, np.float32) if steps.mean is None else steps.mean
        std = np.ones(3, np.float32) if steps.std is None else steps.std
        # (x * scale - mean) / std  ==  x * a + b, per channel
        self.a = torch.from_numpy((scale / std).astype(np.float32)).view(3, 1, 1).to(self.device)
        self.b = torch.from_numpy((-mean / std).astype(np.float32)).view(3, 1, 1).to(self.device)

    def __call__(self, images) -> np.ndarray:
        """uint8 ``(H, W, 3)`` arrays (a zero-size one: no image) -> ``(B, 3, S, S)`` float32;
        rows without an image are zeros, as on the CPU path."""
        import torch
        import torch.nn.functional as F

        S = self.crop
        out = torch.zeros((len(images), 3, S, S), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for i, img in enumerate(images):
                img = np.asarray(img)
                if img.size == 0:
                    continue
                h, w = img.shape[:2]
                x = torch.from_numpy(np.ascontiguousarray(img)).to(self.device, non_blocking=True)
                x = x.permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, H, W), 0..255
                nh, nw = self.steps.output_size(h, w)  # the CPU path's resize target
                # PIL resamples horizontally, then vertically, each pass into an 8-bit image:
                # the same two passes, rounded and clipped between them
                if nw != w:
                    x = F.interpolate(x, size=(h, nw), mode="bicubic", antialias=True, align_corners=False)
                    x = x.round_().clamp_(0, 255)
                if nh != h:
                    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
                    x = x.round_().clamp_(0, 255)
                top, left = (nh - S) // 2, (nw - S) // 2  # the crop fits: S <= the short side
                out[i] = x[0, :, top:top + S, left:left + S] * self.a + self.b
        return out.cpu().numpy()
