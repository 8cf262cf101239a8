"""A generated knowledge graph with WordNet-like relation patterns, and entity features
that carry signal (or not), for tests and ``bench/kge.py``.

Entities form a forest (each has a parent among the earlier ones). Relations, as in
WN9-IMG's nine: ``hypernym``/``hyponym`` (child -> parent and back: an inverse pair),
``member_of``/``has_member`` (an entity and the root of its tree), ``similar_to`` (siblings,
symmetric), ``part_of``/``has_part`` (an entity and a sibling of its parent),
``derived_from``/``derives`` (an entity and its grandparent). With ``pair_split`` False the
triples are split at random (so a test triple's inverse is usually in train, as in WN18 /
WN9-IMG); with True a triple and its inverse land in the same split, so the structure alone
cannot answer from the inverse and features that carry signal help.

Features (``signal`` True), like a gloss that describes an entity and names its class:
``ling[e] = [G[e], G[parent(e)]] + noise`` and ``visual[e] = [H[e], H[root(e)]] + noise``
(two halves, concatenated) with random Gaussian G, H: the second half of a child's vector is
the first half of its parent's, a linear pattern a relation embedding can read (a SUM
G[e] + G[parent] made siblings, parents and children alike look alike and did not help).
With ``signal`` False the vectors are random Gaussians of the same size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RELATIONS = ("hypernym", "hyponym", "member_of", "has_member", "similar_to", "part_of", "has_part",
             "derived_from", "derives")


def synth_kg(n_entities: int = 500, seed: int = 0, branching: int = 4,
             n_roots: int = 8) -> tuple[list[str], np.ndarray, np.ndarray, list[tuple]]:
    """(entity ids, parent array (-1 for roots), root array, triples as (h, r, t) names, each
    with its inverse's index for pair splits as the 4th element)."""
    rng = np.random.default_rng(seed)
    ids = [f"E{i:06d}" for i in range(n_entities)]
    parent = np.full(n_entities, -1, dtype=np.int64)
    for i in range(n_roots, n_entities):
        parent[i] = rng.integers(max(0, (i - n_roots) // branching - 2), max(1, (i - n_roots) // branching + 1))
        parent[i] = min(parent[i], i - 1)
    root = np.arange(n_entities)
    for i in range(n_entities):
        while parent[root[i]] >= 0:
            root[i] = parent[root[i]]
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parent):
        if p >= 0:
            children.setdefault(int(p), []).append(i)
    pairs = []  # (relation, inverse relation or None, a, b)
    for i, p in enumerate(parent):
        if p < 0:
            continue
        pairs.append(("hypernym", "hyponym", i, int(p)))
        if root[i] != p:
            pairs.append(("member_of", "has_member", i, int(root[i])))
        if parent[p] >= 0:
            pairs.append(("derived_from", "derives", i, int(parent[p])))
            uncles = [u for u in children.get(int(parent[p]), []) if u != p]
            if uncles:
                pairs.append(("part_of", "has_part", i, int(uncles[rng.integers(len(uncles))])))
    for kids in children.values():
        for a, b in zip(kids, kids[1:]):
            if rng.random() < 0.5:
                pairs.append(("similar_to", "similar_to", a, b))
    triples = []
    for k, (r, inv, a, b) in enumerate(pairs):
        triples.append((ids[a], r, ids[b], k))
        triples.append((ids[b], inv, ids[a], k))
    return ids, parent, root, triples


def write_synth_kg(out: str | Path, n_entities: int = 500, seed: int = 0, valid: float = 0.08, test: float = 0.08,
                   pair_split: bool = False, feature_dim: int = 32, signal: bool = True, noise: float = 0.5,
                   n_triples: int | None = None) -> dict:
    """Write ``train``/``valid``/``test`` and ``features.parquet`` (entity_id, ling, visual)
    under ``out``; returns counts. ``n_triples``: keep about that many triples (whole
    inverse pairs, drawn at random), e.g. WN9-IMG's 14k for 7k entities."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    ids, parent, root, triples = synth_kg(n_entities, seed)
    if n_triples is not None and n_triples < len(triples):
        keys = np.array(sorted({t[3] for t in triples}))
        keep = set(rng.choice(keys, size=max(1, n_triples // 2), replace=False).tolist())
        triples = [t for t in triples if t[3] in keep]
    if pair_split:
        keys = np.array(sorted({t[3] for t in triples}))
        rng.shuffle(keys)
        n_v, n_t = int(len(keys) * valid), int(len(keys) * test)
        where = {int(k): ("valid" if i < n_v else "test" if i < n_v + n_t else "train") for i, k in enumerate(keys)}
        split_of = [where[t[3]] for t in triples]
    else:
        order = rng.permutation(len(triples))
        n_v, n_t = int(len(triples) * valid), int(len(triples) * test)
        split_of = [""] * len(triples)
        for rank, i in enumerate(order):
            split_of[i] = "valid" if rank < n_v else "test" if rank < n_v + n_t else "train"
    counts = {}
    for split in ("train", "valid", "test"):
        lines = [f"{h}\t{r}\t{t}" for (h, r, t, _), s in zip(triples, split_of) if s == split]
        (out / split).write_text("\n".join(lines) + "\n")
        counts[split] = len(lines)
    half = feature_dim // 2
    G = rng.normal(size=(n_entities, half)).astype(np.float32)
    H = rng.normal(size=(n_entities, half)).astype(np.float32)
    if signal:
        par = np.where(parent >= 0, parent, np.arange(n_entities))
        ling = np.concatenate([G, G[par]], axis=1) + noise * rng.normal(size=(n_entities, 2 * half))
        visual = np.concatenate([H, H[root]], axis=1) + noise * rng.normal(size=(n_entities, 2 * half))
    else:
        ling = rng.normal(size=(n_entities, 2 * half))
        visual = rng.normal(size=(n_entities, 2 * half))
    pq.write_table(pa.table({"entity_id": ids, "ling": [v.tolist() for v in ling.astype(np.float32)],
                             "visual": [v.tolist() for v in visual.astype(np.float32)]}), out / "features.parquet")
    counts["entities"] = n_entities
    return counts
