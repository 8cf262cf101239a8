"""A synthetic multimodal entity-linking dataset that a tiny model can learn on a CPU.

Generative process (deterministic given the seed):

* Entities. Names come from a small pool (one name per ~8 entities), so many entities share
  a name: lexical ambiguity like the paper's "Robert" example, where only the image and the
  context tell the candidates apart. Each entity has three attribute values (occupation,
  country, hobby) written as ``"occupation actor. country france. hobby tennis."`` and a
  visual identity: a background colour, a shape, a shape colour and a position. ~40% of
  entities have no KB image (RichpediaMEL: 46%), some have aliases.
* Mentions. A gold entity is drawn uniformly; the mention string is its name (or an alias,
  25%); the context mixes distractor words with a random subset of the gold's attribute
  values: usually one or two, none for 20% of mentions (then only the image can decide).
  The post image draws the gold's visual identity again with jitter (position, size,
  colour noise, pixel noise); 10% of mentions have no image.
* So neither modality alone suffices: entities without a KB image can only be linked by
  text; mentions with an uninformative context only by the image.

Splits are random: train/dev/test = 70/15/15 % of the mentions by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from otmel.images import encode_png
from otmel.schemas import KB_SCHEMA, MENTION_SCHEMA

log = logging.getLogger(__name__)

NAMES = ("robert", "maria", "james", "anna", "david", "laura", "john", "elena", "peter", "sofia", "michael",
         "clara", "thomas", "julia", "daniel", "nora", "paul", "emma", "lucas", "alice", "victor", "irene",
         "samuel", "helena", "oscar", "lena", "felix", "mira", "hugo", "ines", "adrian", "vera", "leon",
         "rosa", "martin", "eva", "simon", "lara", "bruno", "olga")
OCCUPATIONS = ("actor", "singer", "painter", "writer", "pilot", "chemist", "lawyer", "farmer", "dancer", "sailor",
               "doctor", "teacher")
COUNTRIES = ("france", "japan", "brazil", "canada", "egypt", "norway", "india", "mexico", "spain", "kenya",
             "chile", "poland")
HOBBIES = ("tennis", "chess", "golf", "cycling", "fishing", "boxing", "skiing", "surfing", "rowing", "hiking",
           "karate", "poker")
DISTRACTORS = ("the", "yesterday", "met", "with", "fans", "at", "new", "show", "photo", "today", "during", "visit",
               "spoke", "about", "event", "city", "after", "great", "night", "crowd", "news", "team", "seen", "was")
ALIAS_PREFIX = ("mr", "dr", "young", "old", "big", "little")
LABELS = ("occupation", "country", "hobby")

PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0))
SHAPES = ("circle", "square", "triangle", "cross", "stripes")
POSITIONS = ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7), (0.5, 0.5))

#: every word a synthetic name, attribute or context can contain (a tiny test tokenizer gives
#: each its own token)
SYNTH_VOCABULARY: tuple[str, ...] = tuple(sorted(set(NAMES + OCCUPATIONS + COUNTRIES + HOBBIES + DISTRACTORS
                                                     + ALIAS_PREFIX + LABELS + ("sep",))))

DEFAULT_ENTITIES = 1000
DEFAULT_MENTIONS = 5000


@dataclass
class SynthReport:
    entities: int
    entities_without_image: int
    names: int
    max_entities_per_name: int
    mean_entities_per_name: float
    mentions: dict[str, int] = field(default_factory=dict)
    mentions_without_image: int = 0

    def __str__(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in self.mentions.items())
        return (f"{self.entities} entities ({self.entities_without_image} without image, {self.names} names, "
                f"{self.mean_entities_per_name:.1f} entities per name), mentions: {splits} "
                f"({self.mentions_without_image} without image)")


@dataclass
class _Identity:
    background: int
    shape: int
    color: int
    position: int


def draw_identity(identity: _Identity, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """The entity's picture; with ``rng``, a jittered photo of the same identity."""
    bg = np.array(PALETTE[identity.background], dtype=float)
    fg = np.array(PALETTE[identity.color], dtype=float)
    cx, cy = POSITIONS[identity.position]
    radius = 0.22
    if rng is not None:
        bg = np.clip(bg + rng.normal(0, 12, 3), 0, 255)
        fg = np.clip(fg + rng.normal(0, 12, 3), 0, 255)
        cx, cy = cx + rng.uniform(-0.08, 0.08), cy + rng.uniform(-0.08, 0.08)
        radius *= rng.uniform(0.8, 1.2)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
    d = ImageDraw.Draw(img)
    x, y, r = cx * size, cy * size, radius * size
    color = tuple(int(c) for c in fg)
    shape = SHAPES[identity.shape]
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif shape == "square":
        d.rectangle([x - r, y - r, x + r, y + r], fill=color)
    elif shape == "triangle":
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
    elif shape == "cross":
        w = max(1.0, r / 3)
        d.rectangle([x - r, y - w, x + r, y + w], fill=color)
        d.rectangle([x - w, y - r, x + w, y + r], fill=color)
    else:  # stripes across the whole picture, phase from the position
        step = max(2, size // 6)
        for off in range(int(x) % step - size, size, step):
            d.line([(off, 0), (off + size, size)], fill=color, width=max(1, step // 3))
    if rng is not None:
        arr = np.asarray(img, dtype=float) + rng.normal(0, 8, (size, size, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def write_synthetic_dataset(
    out_dir: str | Path,
    n_entities: int = DEFAULT_ENTITIES,
    n_mentions: int = DEFAULT_MENTIONS,
    seed: int = 0,
    image_size: int = 32,
    missing_image_rate: float = 0.4,
    mention_missing_image_rate: float = 0.1,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> SynthReport:
    """Write ``kb.parquet`` and ``mentions/{train,dev,test}.parquet`` under ``out_dir``."""
    if n_entities < 2 or n_mentions < 3:
        raise ValueError("need at least 2 entities and 3 mentions")
    if abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits must sum to 1, got {splits}")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "mentions").mkdir(parents=True, exist_ok=True)

    n_names = min(len(NAMES), max(2, n_entities // 8))
    names = [NAMES[i % n_names] if i < n_names else NAMES[int(rng.integers(n_names))] for i in range(n_entities)]
    attrs = [(int(rng.integers(len(OCCUPATIONS))), int(rng.integers(len(COUNTRIES))), int(rng.integers(len(HOBBIES))))
             for _ in range(n_entities)]
    identities = []
    for _ in range(n_entities):
        bg, fg = rng.choice(len(PALETTE), 2, replace=False)
        identities.append(_Identity(int(bg), int(rng.integers(len(SHAPES))), int(fg), int(rng.integers(len(POSITIONS)))))
    has_image = rng.random(n_entities) >= missing_image_rate
    aliases = [[f"{ALIAS_PREFIX[int(rng.integers(len(ALIAS_PREFIX)))]} {names[i]}"] if rng.random() < 0.3 else None
               for i in range(n_entities)]

    kb = pa.table({
        "entity_id": [f"Q{100000 + i}" for i in range(n_entities)],
        "name": names,
        "attributes": [f"occupation {OCCUPATIONS[o]}. country {COUNTRIES[c]}. hobby {HOBBIES[h]}."
                       for o, c, h in attrs],
        "image": [encode_png(draw_identity(identities[i], image_size)) if has_image[i] else None
                  for i in range(n_entities)],
        "image_uri": pa.nulls(n_entities, pa.string()),
        "aliases": pa.array(aliases, pa.list_(pa.string())),
    }, schema=KB_SCHEMA)
    pq.write_table(kb, out / "kb.parquet")

    rows: dict[str, list] = {k: [] for k in MENTION_SCHEMA.names}
    no_image = 0
    for j in range(n_mentions):
        g = int(rng.integers(n_entities))
        mention = aliases[g][0] if aliases[g] and rng.random() < 0.25 else names[g]
        o, c, h = attrs[g]
        values = [OCCUPATIONS[o], COUNTRIES[c], HOBBIES[h]]
        n_cues = 0 if rng.random() < 0.2 else int(rng.integers(1, 3))
        words = list(rng.choice(values, n_cues, replace=False)) + list(rng.choice(DISTRACTORS, int(rng.integers(3, 7))))
        rng.shuffle(words)
        with_image = rng.random() >= mention_missing_image_rate
        no_image += not with_image
        rows["mention_id"].append(f"m{j:07d}")
        rows["post_id"].append(f"p{j:07d}")
        rows["mention"].append(mention)
        rows["text"].append(" ".join(str(w) for w in words))
        rows["image"].append(encode_png(draw_identity(identities[g], image_size, rng)) if with_image else None)
        rows["image_uri"].append(None)
        rows["gold_entity_id"].append(f"Q{100000 + g}")
    mentions = pa.table(rows, schema=MENTION_SCHEMA)
    order = rng.permutation(n_mentions)
    n_train = int(round(splits[0] * n_mentions))
    n_dev = int(round(splits[1] * n_mentions))
    parts = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}
    counts = {}
    for split, idx in parts.items():
        pq.write_table(mentions.take(pa.array(np.sort(idx))), out / "mentions" / f"{split}.parquet")
        counts[split] = int(len(idx))
    per_name = np.bincount([NAMES.index(n) for n in names])
    per_name = per_name[per_name > 0]
    report = SynthReport(n_entities, int((~has_image).sum()), int(len(per_name)), int(per_name.max()),
                         float(per_name.mean()), counts, no_image)
    log.info("synthetic dataset %s: %s", out, report)
    return report
