"""Mention-entity matching: S_F (eq. 18), S_T / S_V (eqs 19-24) and S_O (eq. 25).

Every function scores mentions against entities in one of two layouts:

* grid: entity tensors have one leading dim ``(E, ...)``: every mention against every
  entity -> scores ``(M, E)`` (training with in-batch negatives, exhaustive evaluation);
* candidates: entity tensors have two leading dims ``(M, K, ...)``: each mention against its
  own K candidates -> scores ``(M, K)`` (rerank after retrieval).

Unimodal OT matching (eq. 19-23) runs per (mention, entity) pair: the entity's tokens are
the queries (Q = T_e W'_q), the mention's tokens the keys and values, so
``G^{m->e}`` has one row per ENTITY token and its softpool depends on the pair. That is
why linking retrieves with the separable part of S_O first and reranks with the full score
(DESIGN.md "Retrieval then rerank").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from otmel.model.correlation import Assignment, assign


def _pair_layout(mention: torch.Tensor, entity: torch.Tensor, entity_lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast a mention tensor (M, *rest) and an entity tensor against each other.

    grid (entity (E, *rest)):        -> (M, 1, *rest), (1, E, *rest)
    candidates (entity (M, K, *rest)): -> (M, 1, *rest), (M, K, *rest)
    """
    m = mention.unsqueeze(1)
    e = entity.unsqueeze(0) if entity_lead == 1 else entity
    return m, e


@dataclass
class MatchScores:
    """Scores of a layout, each (M, E) or (M, K).

    overall = S_O (eq. 25), fused = S_F, text = S_T, visual = S_V;
    visual_valid: False where S_V is dropped (missing_image = mask and a side has no image).
    """

    overall: torch.Tensor
    fused: torch.Tensor
    text: torch.Tensor
    visual: torch.Tensor
    visual_valid: torch.Tensor


def fused_score(mention_fused: torch.Tensor, entity_fused: torch.Tensor) -> torch.Tensor:
    """eq. 18: ``S_F = <g_m^t (+) g_m^v, g_e^t (+) g_e^v>``; (M, 2d) x (E, 2d) or (M, K, 2d)."""
    if entity_fused.dim() == 2:
        return mention_fused @ entity_fused.T  # (M, E)
    return (mention_fused.unsqueeze(1) * entity_fused).sum(-1)  # (M, K)


def summary_score(mention_summary: torch.Tensor, entity_summary: torch.Tensor) -> torch.Tensor:
    """``<t_m, t_e>`` of eq. 24 (or <v_m, v_e>) in either layout."""
    return fused_score(mention_summary, entity_summary)


def unimodal_score(
    mention_key: torch.Tensor,
    mention_value: torch.Tensor,
    mention_mask: torch.Tensor,
    mention_summary: torch.Tensor,
    entity_query: torch.Tensor,
    entity_mask: torch.Tensor,
    entity_summary: torch.Tensor,
    entity_summary_proj: torch.Tensor,
    pool,
    method: str,
    epsilon: float = 0.05,
    n_iters: int = 3,
    with_logits: bool = False,
) -> tuple[torch.Tensor, Assignment]:
    """eqs 19-24 for one modality.

    Parameters
    ----------
    mention_key, mention_value : (M, Lm, d)   K = X_m W'_k, H = X_m W'_v
    mention_mask : (M, Lm) bool
    mention_summary : (M, P)                  t_m (or v_m)
    entity_query : (E, Le, d) or (M, K, Le, d)  Q = X_e W'_q
    entity_mask : (E, Le) or (M, K, Le)
    entity_summary : (E, P) or (M, K, P)      t_e
    entity_summary_proj : (E, d) or (M, K, d) t_e projected to d, paired with the pooled g_m
    pool : the pooling module (softpool / attnpool)

    Returns
    -------
    score : (M, E) or (M, K)   S_T = (<g_m, t_e> + <t_m, t_e>) / 2
    assignment : the pairwise assignment, weights of shape (M, E|K, Le, Lm)
    """
    lead = entity_query.dim() - 2
    Q = entity_query.unsqueeze(0) if lead == 1 else entity_query  # (1|M, E|K, Le, d)
    Qmask = entity_mask.unsqueeze(0) if lead == 1 else entity_mask  # (1|M, E|K, Le)
    K = mention_key.unsqueeze(1)  # (M, 1, Lm, d)
    H = mention_value.unsqueeze(1)  # (M, 1, Lm, d)
    Kmask = mention_mask.unsqueeze(1)  # (M, 1, Lm)
    a = assign(Q, K, H, Qmask, Kmask, method, epsilon, n_iters, with_logits)
    G = a.transported  # (M, E|K, Le, d): mention tokens moved onto the entity's tokens
    row_mask = Qmask & Kmask.any(-1, keepdim=True)  # an empty mention side moves nothing
    pooled = pool(G, row_mask.expand(G.shape[:-1]))  # (M, E|K, d)  eq. 23
    _, e_proj = _pair_layout(mention_summary, entity_summary_proj, lead)
    ot_term = (pooled * e_proj).sum(-1)  # (M, E|K)
    return 0.5 * (ot_term + summary_score(mention_summary, entity_summary)), a


def overall_score(fused: torch.Tensor, text: torch.Tensor, visual: torch.Tensor, visual_valid: torch.Tensor) -> torch.Tensor:
    """eq. 25, ``S_O = (S_F + S_T + S_V) / 3``; where S_V is invalid (masked images) it is
    dropped and the mean renormalised: ``(S_F + S_T) / 2``."""
    v = visual_valid.to(fused.dtype)
    return (fused + text + visual * v) / (2.0 + v)
