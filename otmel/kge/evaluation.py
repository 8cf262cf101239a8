"""Filtered link-prediction ranking (OTKGE section 6: MRR and H@1/3/10, both directions).

For a test triple (h, r, t), the tail query (h, r, ?) ranks t among every entity, and the
head query (?, r, t) - asked as (t, r^-1, ?) with the reciprocal relation - ranks h. In the
filtered setting (Bordes et al. 2013) the other entities that form a TRUE triple with the
query (in any split) are removed from the ranking. Ties count against the model: the rank
is the number of remaining entities scoring at least the true one's score (the true one
included), so a constant scorer gets the worst rank, not the best.
"""

from __future__ import annotations

import numpy as np
import torch

from otmel.kge.data import KGData

HITS = (1, 3, 10)


def filtered_ranks(model, data: KGData, split: str, batch_size: int = 500) -> np.ndarray:
    """Ranks of every triple of ``split``: (n, 2) = (tail query, head query)."""
    triples = data.splits[split]
    if len(triples) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    tails_of, heads_of = data.filters()
    R = data.num_relations
    model.eval()
    out = np.zeros((len(triples), 2), dtype=np.int64)
    with torch.no_grad():
        table = model.entity_table()
        for direction in (0, 1):
            for start in range(0, len(triples), batch_size):
                chunk = triples[start:start + batch_size]
                if direction == 0:
                    q_ent, q_rel, target = chunk[:, 0], chunk[:, 1], chunk[:, 2]
                    known = [tails_of[(h, r)] for h, r in zip(q_ent.tolist(), q_rel.tolist())]
                else:
                    q_ent, q_rel, target = chunk[:, 2], chunk[:, 1] + R, chunk[:, 0]
                    known = [heads_of[(r, t)] for r, t in zip(chunk[:, 1].tolist(), q_ent.tolist())]
                scores, _ = model(torch.as_tensor(q_ent), torch.as_tensor(q_rel), table)
                scores = scores.float()
                idx = torch.arange(len(chunk))
                target_t = torch.as_tensor(target)
                true_score = scores[idx, target_t].clone()
                for i, k in enumerate(known):
                    scores[i, torch.as_tensor(k)] = -torch.inf
                scores[idx, target_t] = true_score
                out[start:start + len(chunk), direction] = (scores >= true_score[:, None]).sum(1).numpy()
    return out


def ranking_metrics(ranks: np.ndarray) -> dict[str, float]:
    """MRR and H@k over both directions (the mean of the 2n ranks)."""
    flat = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        return {"mrr": float("nan"), **{f"h{k}": float("nan") for k in HITS}, "queries": 0}
    return {"mrr": float(np.mean(1.0 / flat)), **{f"h{k}": float(np.mean(flat <= k)) for k in HITS},
            "queries": int(flat.size)}


def evaluate(model, data: KGData, split: str = "test") -> dict[str, float]:
    return ranking_metrics(filtered_ranks(model, data, split))
