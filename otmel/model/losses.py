"""Training objectives: contrastive losses (eqs 26-27) and OT -> attention distillation (eqs 28-29).

Contrastive losses use in-batch negatives: every mention is scored against every entity of
the (global) batch. An in-batch "negative" that is the row's own gold entity (two mentions
of one entity in a batch) is masked out of the denominator: it is not a negative.

Losses know about ranks (open_clip's habit): the caller passes the mention rows it owns and
the global entity columns (gathered across workers, see ``otmel.jobs.train``) with each
row's gold column index, so one process with the whole batch and N processes with B/N rows
each compute the same total.
"""

from __future__ import annotations

import torch

from otmel.model.correlation import Assignment
from otmel.model.matching import MatchScores

_NEG = -1e4


def allowed_columns(mention_entity_ids: list[str], column_entity_ids: list[str], target: torch.Tensor) -> torch.Tensor:
    """(M, E) bool: columns usable in row i's softmax: all but other copies of row i's gold."""
    M, E = len(mention_entity_ids), len(column_entity_ids)
    index: dict[str, int] = {}
    col_codes = torch.tensor([index.setdefault(e, len(index)) for e in column_entity_ids], dtype=torch.long)
    row_codes = torch.tensor([index.setdefault(e, len(index)) for e in mention_entity_ids], dtype=torch.long)
    same = row_codes[:, None] == col_codes[None, :]  # (M, E)
    is_target = torch.zeros(M, E, dtype=torch.bool)
    is_target[torch.arange(M), target.cpu()] = True
    return (~same) | is_target


def contrastive_loss(scores: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """eq. 26/27: ``-log exp(S(m, e)) / sum_e' exp(S(m, e'))`` summed over rows.

    Parameters
    ----------
    scores : (M, E)
    target : (M,) long, the gold column of each row
    allowed : (M, E) bool, columns in the denominator; rows whose gold is not allowed are
        dropped (e.g. S_V of a pair without images under ``missing_image = mask``).

    Returns
    -------
    (sum of row losses, number of rows counted): the caller divides by the GLOBAL row count.
    """
    M = scores.shape[0]
    rows = torch.arange(M, device=scores.device)
    if allowed is None:
        allowed = torch.ones_like(scores, dtype=torch.bool)
    allowed = allowed.to(scores.device)
    logits = scores.masked_fill(~allowed, _NEG)
    row_ok = allowed[rows, target]
    per_row = torch.logsumexp(logits, dim=-1) - logits[rows, target]  # (M,)
    per_row = per_row * row_ok.to(per_row.dtype)
    return per_row.sum(), row_ok.sum()


def matching_losses(
    scores: MatchScores, target: torch.Tensor, allowed: torch.Tensor, global_rows: int | None = None,
    sum_count=None,
) -> dict[str, torch.Tensor]:
    """eq. 27: ``L = L_O + L_F + L_T + L_V`` (mean over rows; L_V over rows where S_V is valid).

    ``global_rows``: the number of mention rows in the whole (multi-worker) batch; rows of
    L_V with a dropped gold pair are excluded from its count. Returned values are this
    worker's share, so summing them over workers gives the single-process loss.
    ``sum_count``: sums a row count over workers (None = one process).
    """
    M = scores.overall.shape[0]
    n_rows = global_rows if global_rows is not None else M
    out: dict[str, torch.Tensor] = {}
    for name in ("overall", "fused", "text"):
        total, _ = contrastive_loss(getattr(scores, name), target, allowed)
        out[name] = total / n_rows
    v_allowed = allowed & scores.visual_valid
    total, counted = contrastive_loss(scores.visual, target, v_allowed)
    if sum_count is not None:
        counted = sum_count(counted)
    out["visual"] = total / counted.clamp(min=1)
    out["loss"] = out["overall"] + out["fused"] + out["text"] + out["visual"]
    return out


def distillation_kl(assignment: Assignment, target: str = "plan") -> torch.Tensor:
    """eq. 28: KD(A_OT, A_ATT), KL both ways (rows and columns), padded entries excluded.

    ``target = plan`` (default, DESIGN.md): the teacher rows are the OT plan's rows
    normalised to sum to one (and columns likewise); the student is ``softmax(S)`` over the
    real entries. ``target = paper``: eq. 28 as written, softmax over the raw plan entries,
    which are all <= 1/n, so that teacher is uniform to within a few percent.

    Departure from eq. 28, which SUMS the row KLs and the column KLs: we AVERAGE them over
    the real rows and the real columns. With ~40 tokens the sum weighs L_KD ~40x a per-row
    term, and J = L + L_KD then swamps the matching loss: measured on synth data (tiny
    CLIP, 6 epochs), dev H@1 18% with the sum vs ~55% with the mean (OT-only training: 60%).
    The average is then taken over the leading dims (items or mention-entity pairs) that
    have real entries.

    Returns a scalar (0 if nothing is real).
    """
    if assignment.logits is None:
        raise ValueError("distillation needs the attention logits (assign(..., with_logits=True))")
    with torch.autocast(device_type=assignment.logits.device.type, enabled=False):
        return _distillation_kl_fp32(assignment, target)


def _distillation_kl_fp32(assignment: Assignment, target: str) -> torch.Tensor:
    """The body of :func:`distillation_kl` in fp32 (fp64 kept): plans sum to ~1e-3 per
    entry and the row normaliser is clamped at 1e-30, which is 0 in fp16 (0/0 = NaN on
    padded rows), so the KL is never computed in a reduced precision."""
    dtype = torch.promote_types(assignment.logits.dtype, torch.float32)
    plan = assignment.weights.detach().to(dtype)  # the teacher: no gradient into the OT path
    S = assignment.logits.to(dtype)
    qm = assignment.query_mask.unsqueeze(-1)  # (..., n, 1)
    km = assignment.key_mask.unsqueeze(-2)  # (..., 1, m)
    plan, S = torch.broadcast_tensors(plan, S)
    valid = (qm & km).expand(S.shape)  # (..., n, m)
    validf = valid.to(S.dtype)

    def one_way(dim: int) -> torch.Tensor:
        log_q = torch.log_softmax(S.masked_fill(~valid, _NEG), dim=dim)
        if target == "plan":
            p = plan / plan.sum(dim, keepdim=True).clamp_min(1e-30)
        elif target == "paper":
            p = torch.softmax(plan.masked_fill(~valid, _NEG), dim=dim)
        else:
            raise ValueError(f"kd_target must be 'plan' or 'paper', got {target!r}")
        p = p * validf
        kl = torch.xlogy(p, p) - p * log_q  # (..., n, m); 0 where p == 0
        lines = valid.any(-1 if dim == -1 else -2).to(S.dtype)  # (..., n) real rows / (..., m) real cols
        return (kl * validf).sum((-1, -2)) / lines.sum(-1).clamp_min(1.0)  # mean over real rows / cols

    per_item = 0.5 * (one_way(-1) + one_way(-2))  # (...)
    has_real = valid.flatten(-2).any(-1).to(S.dtype)  # (...)
    return (per_item * has_real).sum() / has_real.sum().clamp_min(1.0)
