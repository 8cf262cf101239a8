"""Posts that name several RELATED entities of a KB, and the knowledge graph that relates
them: test data for collective disambiguation (``otmel link --kge-embeddings``).

The OT-MEL paper's example is a post naming "Robert" and "Holland", co-stars: one mention
alone is ambiguous, the pair is not for someone who knows the cast. Over an existing KB
(``kb.parquet`` of :mod:`otmel.data.synth` or any KB with ``name`` and ``attributes``):

1. **Teams.** The KB's entities are shuffled into teams of ``team_size``. The knowledge graph
   says who is in which team: ``(e, member_of, team:k)`` / ``(team:k, has_member, e)`` and
   ``(a, works_with, b)`` for every two members (both directions). Team nodes are KG entities
   without a KB entry (linking ignores them). The triples are split 90/5/5 at random into
   ``triples/{train,valid,test}`` (the ``otmel kge train`` format).
2. **Posts.** A post picks a team and ``mentions_per_post`` of its members. The first is the
   ANCHOR: its context carries ``anchor_cues`` attribute values and it has the KB's image
   (when the entity has one), so the linker resolves it well. The others are written by
   NAME ONLY (fillers, no attribute, no image): alone, chance among their namesakes. Their
   team-mate, the anchor, tells them apart; the KB itself does not.
3. **Files.** ``mentions/{dev,test}.parquet`` (:data:`otmel.data.schemas.MENTION_SCHEMA`, one row
   per mention, ``post_id`` shared by a post's mentions, rows SHUFFLED so a post's mentions
   are not adjacent) and a copy of the KB as ``kb.parquet``: the directory is a dataset for
   ``otmel calibrate --data`` and its mention files are inputs for ``otmel link``.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from otmel.data.schemas import MENTION_SCHEMA
from otmel.data.synth import CUE_PHRASES, FILLERS, SLOTS

TEAM_PREFIX = "team:"
KG_RELATIONS = ("member_of", "has_member", "works_with")


def _attribute_values(attributes: str | None) -> list[tuple[int, str]]:
    """``"occupation actor. country france."`` -> [(slot index, value)] for the known slots."""
    labels = {label: k for k, (label, _) in enumerate(SLOTS)}
    out = []
    for part in (attributes or "").split("."):
        words = part.split()
        if len(words) >= 2 and words[0] in labels:
            out.append((labels[words[0]], " ".join(words[1:])))
    return out


def _context(mention: str, attributes: str | None, n_cues: int, rnd: random.Random) -> str:
    phrases = [mention] + rnd.sample(FILLERS, rnd.randint(1, 2))
    values = _attribute_values(attributes)
    for slot, value in rnd.sample(values, min(n_cues, len(values))):
        phrases.append(rnd.choice(CUE_PHRASES[slot]).format(v=value))
    rnd.shuffle(phrases)
    return " ".join(phrases)


def write_related_posts(kb_path: str | Path, out_dir: str | Path, n_posts: int = 200, team_size: int = 4,
                        mentions_per_post: tuple[int, int] = (2, 3), anchor_cues: int = 2, seed: int = 0,
                        splits: tuple[float, float] = (0.5, 0.5)) -> dict:
    """Write ``triples/``, ``mentions/{dev,test}.parquet`` and ``kb.parquet`` under
    ``out_dir`` (the process is in the module docstring). Returns counts."""
    lo, hi = mentions_per_post
    if not 2 <= lo <= hi <= team_size:
        raise ValueError(f"mentions_per_post must be 2 <= lo <= hi <= team_size ({team_size}), got {mentions_per_post}")
    if n_posts < 2:
        raise ValueError(f"n_posts must be >= 2 (one per split), got {n_posts}")
    rnd = random.Random(seed)
    out = Path(out_dir)
    (out / "mentions").mkdir(parents=True, exist_ok=True)
    (out / "triples").mkdir(parents=True, exist_ok=True)
    kb = pq.read_table(kb_path)
    shutil.copyfile(kb_path, out / "kb.parquet")
    ids = kb.column("entity_id").to_pylist()
    names = kb.column("name").to_pylist()
    attributes = kb.column("attributes").to_pylist() if "attributes" in kb.column_names else [None] * len(ids)
    images = kb.column("image").to_pylist() if "image" in kb.column_names else [None] * len(ids)
    if len(ids) < team_size:
        raise ValueError(f"{kb_path}: {len(ids)} entities, fewer than one team of {team_size}")

    order = list(range(len(ids)))
    rnd.shuffle(order)
    teams = [order[k:k + team_size] for k in range(0, len(order) - team_size + 1, team_size)]
    triples = []
    for k, members in enumerate(teams):
        team = f"{TEAM_PREFIX}{k}"
        for a in members:
            triples += [(ids[a], "member_of", team), (team, "has_member", ids[a])]
            triples += [(ids[a], "works_with", ids[b]) for b in members if b != a]
    rnd.shuffle(triples)
    n_valid = n_test = max(1, len(triples) // 20)
    parts = {"valid": triples[:n_valid], "test": triples[n_valid:n_valid + n_test],
             "train": triples[n_valid + n_test:]}
    for split, rows in parts.items():
        (out / "triples" / split).write_text("".join(f"{h}\t{r}\t{t}\n" for h, r, t in rows))

    posts: list[list[dict]] = []
    for p in range(n_posts):
        members = rnd.sample(rnd.choice(teams), rnd.randint(lo, hi))
        post_id = f"post{p:05d}"
        rows = []
        for j, e in enumerate(members):
            anchor = j == 0
            rows.append({"mention_id": f"{post_id}-{j}", "post_id": post_id, "mention": names[e],
                         "text": _context(names[e], attributes[e], anchor_cues if anchor else 0, rnd),
                         "image": images[e] if anchor else None, "image_uri": None, "gold_entity_id": ids[e]})
        posts.append(rows)
    n_dev = max(1, min(n_posts - 1, round(n_posts * splits[0])))
    counts = {"entities": len(ids), "teams": len(teams), "triples": {s: len(r) for s, r in parts.items()}}
    for split, chunk in (("dev", posts[:n_dev]), ("test", posts[n_dev:])):
        rows = [r for post in chunk for r in post]
        rnd.shuffle(rows)  # a post's mentions are spread over the file
        pq.write_table(pa.Table.from_pylist(rows, schema=MENTION_SCHEMA), out / "mentions" / f"{split}.parquet")
        counts[split] = {"posts": len(chunk), "mentions": len(rows)}
    return counts
