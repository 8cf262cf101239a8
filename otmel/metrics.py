"""Ranking metrics (OT-MEL appendix D, eqs 34-35): H@k and MRR, ranks that cannot flatter.

rank = 1 + #{e != gold : score(e) >= score(gold)}: ties count against the model (a constant
scorer gets the worst rank, not a lucky one). H@k = share of mentions with rank <= k (eq. 34
writes "rank < k", a typo: H@1 would always be 0). MRR = mean of 1 / rank.

Misses (rank = inf, contributing 0 to H@k and MRR):

* a gold entity that was not scored (outside the retrieved candidates);
* a gold score that is not finite (NaN or +-inf): a broken score never earns a hit;
* a mention the evaluation skipped (gold unknown to the KB, unusable row): it stays in N.

Non-finite competitors (NaN, +-inf) count against the gold, whatever their sign: a model
that emits them is not rewarded for it.

Beside the headline, two figures make it comparable with the paper's argsort protocol
(which breaks ties by entity index): ``tied_golds``, the number of mentions whose gold is
tied with at least one other entity, and ``H@1_random_ties``, H@1 with every tie broken
uniformly at random (seeded, so the figure is reproducible).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch


def gold_rank_counts(scores: torch.Tensor, gold_scores: torch.Tensor, is_gold: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """How many competitors beat and tie each mention's gold.

    Parameters
    ----------
    scores : Tensor, shape (M, E)  every scored entity of each mention
    gold_scores : Tensor, shape (M,)  the gold's score (any value where the gold is missing)
    is_gold : BoolTensor, shape (M, E)  True on the gold's column(s): they are not competitors

    Returns
    -------
    beaten : float64 array (M,)  competitors above the gold (non-finite ones included);
        inf where the gold's score is not finite
    tied : int64 array (M,)  finite competitors exactly equal to the gold
    """
    g = gold_scores.unsqueeze(1)  # (M, 1)
    competitor = ~is_gold
    finite = torch.isfinite(scores)
    above = ((scores > g) & finite & competitor).sum(1) + (~finite & competitor).sum(1)
    tied = ((scores == g) & finite & competitor).sum(1)
    beaten = above.double()
    beaten[~torch.isfinite(gold_scores)] = float("inf")
    return beaten.cpu().numpy(), tied.cpu().numpy().astype(np.int64)


def ranks_from_scores(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Ranks (ties against) of the gold columns. scores (M, E), gold (M,) long -> (M,) float64
    (inf where the gold's score is not finite)."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    is_gold = torch.zeros_like(scores, dtype=torch.bool)
    is_gold[rows, gold] = True
    beaten, tied = gold_rank_counts(scores, scores[rows, gold], is_gold)
    return torch.from_numpy(1.0 + beaten + tied)


def ranking_metrics(ranks: Sequence[float] | np.ndarray, ks: Iterable[int] = (1, 3, 5),
                    tied: Sequence[int] | np.ndarray | None = None, seed: int = 0) -> dict[str, float]:
    """H@k (eq. 34) and MRR (eq. 35) from ties-against ranks (inf = miss).

    With ``tied`` (per mention, the competitors tied with the gold), also ``tied_golds`` and
    ``H@1_random_ties``: each mention's rank with its ties broken uniformly at random
    (``rank - U``, U uniform on {0, ..., tied}), from a generator seeded with ``seed``.
    """
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks to compute metrics from")
    out = {f"H@{k}": float(np.mean(r <= k)) for k in ks}
    out["MRR"] = float(np.mean(np.where(np.isfinite(r), 1.0 / r, 0.0)))
    out["count"] = int(r.size)
    out["misses"] = int(np.sum(~np.isfinite(r)))
    if tied is not None:
        t = np.where(np.isfinite(r), np.asarray(tied, dtype=np.int64), 0)
        if t.shape != r.shape:
            raise ValueError(f"tied has shape {t.shape}, ranks {r.shape}")
        drawn = np.random.default_rng(seed).integers(0, t + 1)  # U in {0..tied} per mention
        out["tied_golds"] = int(np.sum(t > 0))
        out["H@1_random_ties"] = float(np.mean((r - drawn) <= 1))
    return out


def format_metrics(metrics: dict[str, float]) -> str:
    """A one-line table row: H@1 80.00 | H@3 ... (percentages, like the paper's tables)."""
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isnan(v) and (k.startswith("H@") or k in ("MRR",) or k.startswith("recall")):
            parts.append(f"{k} {100 * v:.2f}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k} {v:g}")
    return " | ".join(parts)
