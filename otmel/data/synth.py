"""A synthetic multimodal entity-linking dataset that a tiny model can learn on a CPU.

The data reproduces, in miniature, what makes multimodal entity linking hard: many entities
share a name (the paper's "Robert" example), and only the post's image and the few
attribute words in its text tell the candidates apart. Neither modality alone suffices.

Generative process (deterministic given ``seed``):

1. Names. A pool of ``n_entities / entities_per_name`` two-word names ("robert king") is
   drawn from first names x surnames (1600 names at most, so past ~14k entities the groups
   grow); entities are spread evenly over it, so each name is shared by ~9 entities (lexical
   ambiguity: the name narrows the KB down to its group, no further).
2. Attributes. Three slots (occupation, country, sport) of 12 values each, written as
   ``"occupation actor. country france. sport tennis."`` (the paper's attributes as texts
   separated by periods). Within a name group each slot's values are drawn WITHOUT
   replacement (values repeat only in groups of more than 12), so one attribute word is
   enough to single out an entity among its namesakes - when the post mentions one.
3. Visual identity. Background colour, shape (circle, square, triangle, cross, stripes),
   shape colour, position and size; within a name group every two identities differ in at
   least two of these. The KB image draws the identity cleanly. ``missing_image_rate``
   (default 40%; RichpediaMEL: 46%) of the entities have no KB image.
4. Aliases. ~40% of the entities get one or two aliases ("dr king", "king").
5. Mentions. The gold entity is drawn uniformly. The mention string is its name, or for
   entities with aliases sometimes an alias (25%). The context is a shuffled bag of short
   phrases: the mention itself, 1-2 fillers, k of the gold's attribute values ("playing
   tennis", "from france") and, for 25% of mentions, one CONFUSER phrase carrying an
   attribute value of another entity of the same name. The post image (missing for
   ``mention_missing_image_rate`` = 10%) redraws the gold's identity with jitter: position,
   size, colours, brightness, pixel noise and sometimes a small clutter shape.
6. Which modality decides. When the gold entity has a KB image and the post has an image,
   k is 0 (35%: the text is uninformative, only the image decides), 1 (40%) or 2 (25%).
   Otherwise (no image to match) k is 1 or 2, so the text decides. Hence text-only and
   image-only scorers are both far above chance but imperfect, and the name alone gives
   chance among the namesakes (tests/test_synth.py measures all three).
7. Splits. Mentions are shuffled into train/dev/test (70/15/15 % by default); mention ids
   ``m<index>``, one post per mention (``p<index>``), gold ids always in the KB.

Output: ``out_dir/kb.parquet`` and ``out_dir/mentions/{train,dev,test}.parquet`` in the
schemas of :mod:`otmel.data.schemas`, images as PNG bytes in ``image`` (``image_uri`` null).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from otmel.io.images import encode_png
from otmel.data.schemas import KB_SCHEMA, MENTION_SCHEMA

log = logging.getLogger(__name__)

DEFAULT_ENTITIES = 1000
DEFAULT_MENTIONS = 5000
DEFAULT_ENTITIES_PER_NAME = 9.0
SPLITS = ("train", "dev", "test")

FIRST_NAMES = ("robert", "maria", "james", "anna", "david", "laura", "john", "elena", "peter", "sofia",
               "michael", "clara", "thomas", "julia", "daniel", "nora", "paul", "emma", "lucas", "alice",
               "victor", "irene", "samuel", "helena", "oscar", "lena", "felix", "mira", "hugo", "ines",
               "adrian", "vera", "leon", "rosa", "martin", "eva", "simon", "lara", "bruno", "olga")
SURNAMES = ("king", "stone", "wood", "hill", "brook", "field", "moore", "lake", "ford", "shaw",
            "grant", "reed", "price", "wells", "hart", "cole", "fox", "west", "lane", "black",
            "frost", "marsh", "bell", "rivers", "hayes", "mills", "nash", "page", "rowe", "snow",
            "vance", "webb", "york", "dale", "finch", "gale", "holt", "kemp", "lord", "park")
TITLES = ("mr", "mrs", "dr", "prof", "sir", "coach", "captain")

#: attribute slots: (label, values). Every slot has the same number of values.
SLOTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("occupation", ("actor", "singer", "painter", "writer", "pilot", "chemist", "lawyer", "farmer", "dancer",
                    "sailor", "doctor", "teacher")),
    ("country", ("france", "japan", "brazil", "canada", "egypt", "norway", "india", "mexico", "spain", "kenya",
                 "chile", "poland")),
    ("sport", ("tennis", "chess", "golf", "cycling", "fishing", "boxing", "skiing", "surfing", "rowing", "hiking",
               "karate", "poker")),
)
#: how a context sentence carries an attribute value, per slot. Phrases (and fillers) have at
#: most 3 words, so "{mention} [SEP] {context}" fits in 24 CLIP tokens (see MAX_CONTEXT_WORDS).
CUE_PHRASES: tuple[tuple[str, ...], ...] = (
    ("the {v}", "a famous {v}", "as a {v}", "the {v} herself", "our favourite {v}"),
    ("in {v}", "from {v}", "back in {v}", "trip to {v}", "born in {v}"),
    ("playing {v}", "a {v} match", "loves {v}", "the {v} club", "after {v} practice"),
)
FILLERS = ("was seen", "yesterday", "at the event", "with fans", "said", "on stage", "during the visit",
           "photo of", "last night", "in the news", "met the press", "new interview", "big crowd", "this week",
           "spoke about", "after the show", "smiling", "next to friends", "today", "arrives")

PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 128, 128))
SHAPES = ("circle", "square", "triangle", "cross", "stripes")
POSITIONS = ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7), (0.5, 0.5))
SIZES = (0.17, 0.26)  # shape radius as a fraction of the image side

P_CUES_WITH_IMAGE = (0.35, 0.40, 0.25)  # P(k = 0, 1, 2) when the image can decide
P_CUES_WITHOUT_IMAGE = (0.0, 0.6, 0.4)  # P(k = 0, 1, 2) when only the text can
P_CONFUSER = 0.25
P_ALIASES = 0.4
P_ALIAS_MENTION = 0.25
P_CLUTTER = 0.3
PNG_LEVEL = 1  # fast PNG compression: encoding dominates the generation time
#: words of a context at most: the mention (2) + 2 fillers + 2 cues + 1 confuser of <= 3 words
MAX_CONTEXT_WORDS = 2 + 5 * 3


def _words(*texts: str) -> set[str]:
    return {w for t in texts for w in t.lower().replace(".", " ").split()}


#: every word a synthetic name, alias, attribute text or context can contain, plus "sep" (the
#: model templates' "[SEP]" marker): a tiny test tokenizer gives each its own token.
SYNTH_VOCABULARY: tuple[str, ...] = tuple(sorted(
    _words(*FIRST_NAMES, *SURNAMES, *TITLES, *FILLERS, "sep")
    | _words(*(label for label, _ in SLOTS), *(v for _, values in SLOTS for v in values))
    | _words(*(p.format(v="") for phrases in CUE_PHRASES for p in phrases))
))


@dataclass
class SynthReport:
    """What :func:`write_synthetic_dataset` wrote (the CLI prints ``str(report)``)."""

    entities: int
    entities_without_image: int
    names: int
    max_entities_per_name: int
    mean_entities_per_name: float
    mentions: dict[str, int] = field(default_factory=dict)  # rows per split
    mentions_without_image: int = 0
    mentions_without_cue: int = 0  # context carries none of the gold's attribute values
    alias_mentions: int = 0

    def __str__(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in self.mentions.items())
        return (f"{self.entities} entities ({self.entities_without_image} without image, {self.names} names, "
                f"{self.mean_entities_per_name:.1f} entities per name, at most {self.max_entities_per_name}); "
                f"mentions: {splits} ({self.mentions_without_image} without image, "
                f"{self.mentions_without_cue} with an uninformative context, {self.alias_mentions} by alias)")


@dataclass(frozen=True)
class VisualIdentity:
    """What an entity looks like: indices into PALETTE, SHAPES, PALETTE, POSITIONS, SIZES."""

    background: int
    shape: int
    color: int
    position: int
    size: int

    def differences(self, other: "VisualIdentity") -> int:
        return sum(a != b for a, b in zip(
            (self.background, self.shape, self.color, self.position, self.size),
            (other.background, other.shape, other.color, other.position, other.size)))


class PhotoJitter:
    """Random perturbations of a post photo, deterministic given the seed.

    Scalars come from a ``random.Random`` and pixel noise is a random slice of one pre-drawn
    Gaussian bank, much cheaper than fresh numpy draws per image (tens of thousands of them).
    The bank holds at least 16 images' worth of noise for ``image_size`` px images.
    """

    def __init__(self, seed: int, image_size: int = 32):
        self.rnd = random.Random(seed)
        bank_size = max(1 << 18, 16 * 3 * image_size * image_size)
        self._bank = np.random.default_rng(seed).standard_normal(bank_size, dtype=np.float32)

    def noise(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        n = int(np.prod(shape))
        if n >= len(self._bank):
            raise ValueError(f"noise of {n} values exceeds the bank of {len(self._bank)}")
        start = self.rnd.randrange(len(self._bank) - n)
        return self._bank[start:start + n].reshape(shape) * np.float32(sigma)


def draw_identity(identity: VisualIdentity, size: int, jitter: PhotoJitter | None = None) -> Image.Image:
    """The entity's picture; with ``jitter``, a perturbed photo of the same identity (a post image)."""
    bg, fg = PALETTE[identity.background], PALETTE[identity.color]
    cx, cy = POSITIONS[identity.position]
    radius = SIZES[identity.size]
    if jitter is not None:
        r = jitter.rnd
        bg = tuple(c + r.gauss(0, 10) for c in bg)
        fg = tuple(c + r.gauss(0, 10) for c in fg)
        cx, cy = cx + r.uniform(-0.06, 0.06), cy + r.uniform(-0.06, 0.06)
        radius *= r.uniform(0.85, 1.15)
    img = Image.new("RGB", (size, size), _rgb(bg))
    draw = ImageDraw.Draw(img)
    _draw_shape(draw, SHAPES[identity.shape], cx * size, cy * size, radius * size, _rgb(fg))
    if jitter is None:
        return img
    r = jitter.rnd
    if r.random() < P_CLUTTER:  # an unrelated small object somewhere in the photo
        x, y, rad = r.uniform(0.1, 0.9) * size, r.uniform(0.1, 0.9) * size, 0.07 * size
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=r.choice(PALETTE))
    pixels = np.asarray(img, dtype=np.float32) * np.float32(r.uniform(0.85, 1.15))
    pixels += jitter.noise(pixels.shape, 6.0)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _rgb(color: tuple[float, ...]) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, int(round(c)))) for c in color)
    return r, g, b


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float,
                color: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=color)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
    elif shape == "cross":
        w = max(1.0, r / 3)
        draw.rectangle([x - r, y - w, x + r, y + w], fill=color)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=color)
    elif shape == "stripes":  # three horizontal bars filling the shape's box
        h = max(1.0, r / 3)
        for k in (-1, 0, 1):
            cy = y + k * 2 * r / 3
            draw.rectangle([x - r, cy - h / 2, x + r, cy + h / 2], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------------------- entities
@dataclass
class _Entity:
    entity_id: str
    group: int  # index of its name group
    first: str
    surname: str
    values: tuple[int, ...]  # one value index per slot
    identity: VisualIdentity
    has_image: bool
    aliases: list[str] | None

    @property
    def name(self) -> str:
        return f"{self.first} {self.surname}"

    @property
    def attributes(self) -> str:
        return " ".join(f"{label} {values[v]}." for (label, values), v in zip(SLOTS, self.values))


def _name_groups(n_entities: int, entities_per_name: float, rnd: random.Random) -> list[list[int]]:
    """Entity indices grouped by shared name; groups as even as possible."""
    n_names = max(1, min(len(FIRST_NAMES) * len(SURNAMES), round(n_entities / entities_per_name)))
    order = list(range(n_entities))
    rnd.shuffle(order)
    return [order[g::n_names] for g in range(n_names)]


def _group_values(group_size: int, rnd: random.Random) -> list[tuple[int, ...]]:
    """Attribute value indices for one name group: per slot, without replacement (cycling
    through fresh permutations for groups larger than a slot's value count)."""
    per_slot = []
    for _, values in SLOTS:
        column: list[int] = []
        while len(column) < group_size:
            perm = list(range(len(values)))
            rnd.shuffle(perm)
            column.extend(perm)
        per_slot.append(column[:group_size])
    return [tuple(col[i] for col in per_slot) for i in range(group_size)]


def _group_identities(group_size: int, rnd: random.Random, min_differences: int = 2) -> list[VisualIdentity]:
    """Visual identities for one name group, pairwise different in >= ``min_differences``
    factors (relaxed to 1 after many failed draws, which only very large groups hit)."""
    chosen: list[VisualIdentity] = []
    for _ in range(group_size):
        for attempt in range(200):
            bg = rnd.randrange(len(PALETTE))
            fg = rnd.choice([c for c in range(len(PALETTE)) if c != bg])
            cand = VisualIdentity(bg, rnd.randrange(len(SHAPES)), fg, rnd.randrange(len(POSITIONS)),
                                  rnd.randrange(len(SIZES)))
            need = min_differences if attempt < 100 else 1
            if all(cand.differences(other) >= need for other in chosen):
                break
        chosen.append(cand)
    return chosen


def _make_entities(n_entities: int, entities_per_name: float, missing_image_rate: float,
                   rnd: random.Random) -> tuple[list[_Entity], list[list[int]]]:
    groups = _name_groups(n_entities, entities_per_name, rnd)
    names = rnd.sample([(f, s) for f in FIRST_NAMES for s in SURNAMES], len(groups))
    entities: list[_Entity | None] = [None] * n_entities
    for g, ((first, surname), members) in enumerate(zip(names, groups)):
        values = _group_values(len(members), rnd)
        identities = _group_identities(len(members), rnd)
        for i, v, ident in zip(members, values, identities):
            aliases = None
            if rnd.random() < P_ALIASES:
                aliases = [f"{rnd.choice(TITLES)} {surname}"]
                if rnd.random() < 0.5:
                    aliases.append(surname)
            entities[i] = _Entity(f"Q{100000 + i}", g, first, surname, v, ident,
                                  rnd.random() >= missing_image_rate, aliases)
    return [e for e in entities if e is not None], groups


# ---------------------------------------------------------------------------- mentions
def _context(mention: str, gold: _Entity, namesakes: list[_Entity], n_cues: int, rnd: random.Random) -> str:
    """Shuffled phrases: the mention, fillers, ``n_cues`` gold attribute values and maybe one
    confuser value of a namesake (one not shared with the gold)."""
    phrases = [mention] + rnd.sample(FILLERS, rnd.randint(1, 2))
    for slot in rnd.sample(range(len(SLOTS)), n_cues):
        phrases.append(rnd.choice(CUE_PHRASES[slot]).format(v=SLOTS[slot][1][gold.values[slot]]))
    others = [e for e in namesakes if e is not gold]
    if others and rnd.random() < P_CONFUSER:
        other = rnd.choice(others)
        slot = rnd.randrange(len(SLOTS))
        if other.values[slot] != gold.values[slot]:
            phrases.append(rnd.choice(CUE_PHRASES[slot]).format(v=SLOTS[slot][1][other.values[slot]]))
    rnd.shuffle(phrases)
    return " ".join(phrases)


def _split_sizes(n: int, splits: tuple[float, float, float]) -> list[int]:
    sizes = [int(n * p) for p in splits[:-1]]
    sizes.append(n - sum(sizes))
    for k in range(len(sizes)):  # every split gets at least one mention
        if sizes[k] == 0:
            donor = int(np.argmax(sizes))
            sizes[donor] -= 1
            sizes[k] += 1
    return sizes


def write_synthetic_dataset(
    out_dir: str | Path,
    n_entities: int = DEFAULT_ENTITIES,
    n_mentions: int = DEFAULT_MENTIONS,
    seed: int = 0,
    image_size: int = 32,
    missing_image_rate: float = 0.4,
    mention_missing_image_rate: float = 0.1,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    entities_per_name: float = DEFAULT_ENTITIES_PER_NAME,
) -> SynthReport:
    """Write ``kb.parquet`` and ``mentions/{train,dev,test}.parquet`` under ``out_dir``.

    ``n_entities`` KB entities and ``n_mentions`` mentions in all, split by the ``splits``
    fractions; images are ``image_size`` px PNGs. Same arguments, same bytes. The generative
    process is in the module docstring. Returns a :class:`SynthReport`.
    """
    if n_entities < 2:
        raise ValueError(f"n_entities must be >= 2, got {n_entities}")
    if n_mentions < len(SPLITS):
        raise ValueError(f"n_mentions must be >= {len(SPLITS)} (one per split), got {n_mentions}")
    if len(splits) != len(SPLITS) or min(splits) <= 0 or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits must be 3 positive fractions summing to 1, got {splits}")
    for name, rate in (("missing_image_rate", missing_image_rate),
                       ("mention_missing_image_rate", mention_missing_image_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 px, got {image_size}")
    if entities_per_name < 1:
        raise ValueError(f"entities_per_name must be >= 1, got {entities_per_name}")

    rnd = random.Random(seed)  # entities, mentions, splits
    jitter = PhotoJitter(seed + 1, image_size)  # post photos
    out = Path(out_dir)
    (out / "mentions").mkdir(parents=True, exist_ok=True)

    entities, groups = _make_entities(n_entities, entities_per_name, missing_image_rate, rnd)
    kb = pa.table({
        "entity_id": [e.entity_id for e in entities],
        "name": [e.name for e in entities],
        "attributes": [e.attributes for e in entities],
        "image": [encode_png(draw_identity(e.identity, image_size), PNG_LEVEL) if e.has_image else None
                  for e in entities],
        "image_uri": pa.nulls(n_entities, pa.string()),
        "aliases": [e.aliases for e in entities],
    }, schema=KB_SCHEMA)
    pq.write_table(kb, out / "kb.parquet")

    rows: dict[str, list] = {k: [] for k in MENTION_SCHEMA.names}
    width = len(str(n_mentions - 1))
    no_image = no_cue = by_alias = 0
    for j in range(n_mentions):
        gold = entities[rnd.randrange(n_entities)]
        namesakes = [entities[i] for i in groups[gold.group]]
        alias = gold.aliases is not None and rnd.random() < P_ALIAS_MENTION
        mention = rnd.choice(gold.aliases) if alias and gold.aliases else gold.name
        with_image = rnd.random() >= mention_missing_image_rate
        image_decides = with_image and gold.has_image
        n_cues = rnd.choices((0, 1, 2), P_CUES_WITH_IMAGE if image_decides else P_CUES_WITHOUT_IMAGE)[0]
        no_image += not with_image
        no_cue += n_cues == 0
        by_alias += alias
        rows["mention_id"].append(f"m{j:0{width}d}")
        rows["post_id"].append(f"p{j:0{width}d}")
        rows["mention"].append(mention)
        rows["text"].append(_context(mention, gold, namesakes, n_cues, rnd))
        photo = draw_identity(gold.identity, image_size, jitter) if with_image else None
        rows["image"].append(encode_png(photo, PNG_LEVEL) if photo is not None else None)
        rows["image_uri"].append(None)
        rows["gold_entity_id"].append(gold.entity_id)
    mentions = pa.table(rows, schema=MENTION_SCHEMA)

    order = list(range(n_mentions))
    rnd.shuffle(order)
    counts: dict[str, int] = {}
    start = 0
    for split, size in zip(SPLITS, _split_sizes(n_mentions, splits)):
        idx = sorted(order[start:start + size])
        start += size
        pq.write_table(mentions.take(pa.array(idx, pa.int64())), out / "mentions" / f"{split}.parquet")
        counts[split] = size

    sizes = [len(g) for g in groups]
    report = SynthReport(
        entities=n_entities,
        entities_without_image=sum(not e.has_image for e in entities),
        names=len(groups),
        max_entities_per_name=max(sizes),
        mean_entities_per_name=float(np.mean(sizes)),
        mentions=counts,
        mentions_without_image=no_image,
        mentions_without_cue=no_cue,
        alias_mentions=by_alias,
    )
    log.info("synthetic dataset %s: %s", out, report)
    return report
