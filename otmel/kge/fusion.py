"""Multimodal fusion of entity embeddings (OTKGE section 4, Algorithm 1) and its ablations.

Notation (the paper's): E_S is the structural embedding table, (N entities, m dims); E_k the
features of modality k (linguistic I, visual V), (N, n_k). The support points of the OT
problem are the embedding DIMENSIONS, not the entities: dimension i of E_k is the vector
E_k[:, i] over all entities, and

    C_k[i, j] = || E_k[:, i] - E_S[:, j] ||^2                         (Algorithm 1)
    T_k = OT(mu_k = 1/n_k, nu = 1/m, C_k)           (eq. 1, entropic: otmel.model.ot.sinkhorn)
    Ehat_k = diag(1/v) (T_k^T + Delta_T) E_k                                       (eq. 2)

with E_k read as (n_k, N) in eq. 2, i.e. in (N, dims) layout ``Ehat_k = E_k @ (m T_k +
Delta_k)``, ``Delta_k`` = m Delta_T^T, learnable, initialised at 0 (stored scaled by m so that
its learning rate is not multiplied by m). Each column of m * T_k sums
to 1, so dimension j of Ehat_k is a barycentric average of the modal dimensions transported
to structural dimension j: Ehat_k lives in the structural space.

Fusion (eq. 3): E_F = argmin_E 1/3 sum_i lambda_i W(Ehat_i, E) over i in {I, V, S}. After the
alignment every Ehat_i is expressed in the same m coordinates as E_S (dimension j of each is
matched to structural dimension j), and for W_2^2 with that identity coupling the minimiser
is the lambda-weighted mean of the aligned embeddings; we take that, with lambda = softmax
of learned logits (the paper gives the lambda_i as weights without a value). A departure:
we do not solve a free-support barycenter problem per step.

Choices where the paper is silent (stated, not the paper's):
* the plan is computed every forward pass at the current E_S, without gradient through the
  Sinkhorn iterations: gradients reach E_S, Delta_k and lambda through the fused table;
* the cost is divided by its mean before Sinkhorn (epsilon is then relative to the typical
  cost: the raw scales of features and embeddings differ by orders of magnitude);
* features are centred and L2-normalised per entity when loaded (:func:`prepare_features`).

Ablations (the paper's Table 3, one flag away): ``mean`` and ``concat`` replace the OT
alignment by a learned linear projection P_k (n_k -> m), then a lambda-weighted mean, or a
concatenation [E_S, P_I E_I, P_V E_V] (the fused dimension is then (1 + K) m).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

FUSIONS = ("ot", "mean", "concat")


def prepare_features(matrix: np.ndarray) -> np.ndarray:
    """Centre each dimension and L2-normalise each entity's vector (zero rows stay zero)."""
    x = matrix.astype(np.float32)
    present = np.abs(x).sum(1) > 0
    if present.any():
        x[present] -= x[present].mean(0, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norms > 0, x / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def dimension_cost(features: Tensor, structural: Tensor) -> Tensor:
    """C[i, j] = ||features[:, i] - structural[:, j]||^2: (n_k, m) over the N entities."""
    sq_f = (features * features).sum(0)
    sq_s = (structural * structural).sum(0)
    return (sq_f[:, None] + sq_s[None, :] - 2 * features.T @ structural).clamp_min(0)


def dimension_plan(features: Tensor, structural: Tensor, epsilon: float = 0.05, n_iters: int = 50) -> Tensor:
    """T_k (n_k, m): uniform marginals 1/n_k and 1/m, entropic OT on the dimension cost."""
    from otmel.model.ot import sinkhorn

    with torch.no_grad():
        cost = dimension_cost(features.float(), structural.detach().float())
        cost = cost / cost.mean().clamp_min(1e-12)
        return sinkhorn(cost, epsilon=epsilon, n_iters=n_iters)


class Fusion(nn.Module):
    """Structural table (N, m) + modal features {k: (N, n_k)} -> fused table (N, out_dim)."""

    def __init__(self, kind: str, dim: int, modal_dims: dict[str, int], epsilon: float = 0.05, n_iters: int = 50):
        super().__init__()
        if kind not in FUSIONS:
            raise ValueError(f"--fusion must be one of {FUSIONS}, got {kind!r}")
        self.kind, self.dim, self.modalities = kind, dim, tuple(modal_dims)
        self.epsilon, self.n_iters = epsilon, n_iters
        if kind == "ot":
            self.delta = nn.ParameterDict({k: nn.Parameter(torch.zeros(n, dim)) for k, n in modal_dims.items()})
        else:
            self.project = nn.ModuleDict({k: nn.Linear(n, dim, bias=False) for k, n in modal_dims.items()})
            for lin in self.project.values():
                nn.init.normal_(lin.weight, std=1.0 / np.sqrt(lin.in_features))
        # lambda over (S, *modalities): equal at start
        self.lam_logits = nn.Parameter(torch.zeros(1 + len(modal_dims)))
        self.last_plans: dict[str, Tensor] = {}

    @property
    def out_dim(self) -> int:
        return self.dim * (1 + len(self.modalities)) if self.kind == "concat" else self.dim

    def lambdas(self) -> Tensor:
        return torch.softmax(self.lam_logits, 0)

    def aligned(self, structural: Tensor, features: dict[str, Tensor]) -> list[Tensor]:
        """[E_S, Ehat_I, Ehat_V, ...] each (N, m)."""
        out = [structural]
        for k in self.modalities:
            if self.kind == "ot":
                plan = dimension_plan(features[k], structural, self.epsilon, self.n_iters)
                self.last_plans[k] = plan
                out.append(features[k] @ (self.dim * plan + self.delta[k]))  # delta[k] = m Delta_T^T
            else:
                out.append(self.project[k](features[k]))
        return out

    def forward(self, structural: Tensor, features: dict[str, Tensor]) -> Tensor:
        parts, lam = self.aligned(structural, features), self.lambdas()
        if self.kind == "concat":
            return torch.cat([w * p for w, p in zip(lam * len(parts), parts)], dim=-1)
        return sum(w * p for w, p in zip(lam, parts))
