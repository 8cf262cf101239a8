"""Ranking metrics (OT-MEL appendix D, eqs 34-35): H@k and MRR.

rank = 1 + #{e != gold : score(e) >= score(gold)}: ties count against the model (a constant
scorer gets the worst rank, not a lucky one). H@k = share of mentions with rank <= k (eq. 34
writes "rank < k", a typo: H@1 would always be 0). MRR = mean of 1 / rank. A mention whose
gold entity was not scored (e.g. outside the retrieved candidates) has rank = inf and
contributes 0 to H@k and MRR.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch


def ranks_from_scores(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Ranks of the gold columns. scores (M, E), gold (M,) long -> (M,) long."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    gold_score = scores[rows, gold].unsqueeze(1)  # (M, 1)
    at_least = (scores >= gold_score).sum(1)  # includes the gold itself
    return at_least  # = 1 + #{e != gold : s_e >= s_gold}


def ranking_metrics(ranks: Sequence[float] | np.ndarray, ks: Iterable[int] = (1, 3, 5)) -> dict[str, float]:
    """H@k (eq. 34) and MRR (eq. 35) from ranks (inf = not found)."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks to compute metrics from")
    out = {f"H@{k}": float(np.mean(r <= k)) for k in ks}
    out["MRR"] = float(np.mean(np.where(np.isfinite(r), 1.0 / r, 0.0)))
    out["count"] = int(r.size)
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
