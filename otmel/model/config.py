"""OT-MEL's configuration: the hyper-parameters saved as ``config.json`` beside the weights,
the text templates the model is trained with, and the default CLIP. Torch-free: the input
processors (``otmel.model.preprocessing``) take their templates from here, so the model owns
its prompts and the preprocess tasks import no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

#: Default real CLIP: the paper initialises from CLIP ViT-B/32.
DEFAULT_CLIP = "openai/clip-vit-base-patch32"

#: The text template of the authors' release (CLIP has no [SEP] token: the tokenizer
#: splits it into "[", "sep", "]", which is what the release feeds CLIP as well).
MENTION_TEMPLATE = "{mention} [SEP] {context}"
ENTITY_TEMPLATE = "{name} [SEP] {attributes}"

MODES = ("ot", "att", "kd")

@dataclass
class ModelConfig:
    """Hyper-parameters of OT-MEL; saved as ``config.json`` beside the weights."""

    mode: str = "kd"  # ot | att | kd (see module docstring)
    clip: str | None = DEFAULT_CLIP  # hub name / local dir of the initial CLIP weights
    clip_config: dict | None = None  # full CLIPConfig (filled on save: reloads need no hub)
    input_width: int = 512  # token features projected to this width (the release's 512)
    dim: int = 96  # d of the correlation modules (paper: 96)
    text_length: int = 40  # tokens per text (the release: 40)
    pooling: str = "softpool"  # softpool (eqs 13-14) | attnpool (the release)
    missing_image: str = "zeros"  # zeros (the release) | mask (visual tokens masked)
    ot_epsilon: float = 0.05  # Sinkhorn reg (POT's sense); see otmel.model.ot on the paper's 0.6
    ot_iters: int = 3  # Sinkhorn iterations (the release: 3)
    kd_target: str = "plan"  # plan (row/col-normalised plan) | paper (eq. 28 as written)
    kd_weight: float = 1.0  # J = L + kd_weight * L_KD (eq. 29 has 1)
    mention_template: str = MENTION_TEMPLATE
    entity_template: str = ENTITY_TEMPLATE
    extra: dict = field(default_factory=dict)  # free-form metadata (e.g. calibrated NIL threshold)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.pooling not in ("softpool", "attnpool"):
            raise ValueError(f"pooling must be softpool or attnpool, got {self.pooling!r}")
        if self.missing_image not in ("zeros", "mask"):
            raise ValueError(f"missing_image must be zeros or mask, got {self.missing_image!r}")
        if self.kd_target not in ("plan", "paper"):
            raise ValueError(f"kd_target must be plan or paper, got {self.kd_target!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"otmel_version", "format"}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})
