"""The OTKGE model: structural embeddings, relation embeddings (with reciprocals), the
fusion of :mod:`otmel.kge.fusion`, and scores against every entity.

``modalities``: ``structure`` (the uni-modal baseline: no fusion), ``ling``, ``visual`` or
``all`` (both). The modal features are fixed buffers (pre-trained, as in the paper: "we
update the structural embedding in the training"); what is learned is E_S, the relations,
and the fusion's Delta_T / projections and lambda.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from otmel.kge import relations

MODALITY_CHOICES = {"structure": (), "ling": ("ling",), "visual": ("visual",), "all": ("ling", "visual")}


@dataclass
class KGEConfig:
    num_entities: int
    num_relations: int  # without reciprocals
    model: str = "complex"
    dim: int = 400  # reals per structural embedding (ComplEx/RotatE: dim / 2 complex numbers)
    modalities: str = "structure"
    fusion: str = "ot"
    modal_dims: dict[str, int] = field(default_factory=dict)
    init_scale: float = 1e-3  # the kbc recipe's initialisation (Lacroix et al. 2018)
    ot_epsilon: float = 0.05
    ot_iters: int = 50

    def __post_init__(self):
        if self.model not in relations.MODELS:
            raise ValueError(f"--model must be one of {relations.MODELS}, got {self.model!r}")
        if self.modalities not in MODALITY_CHOICES:
            raise ValueError(f"--modalities must be one of {tuple(MODALITY_CHOICES)}, got {self.modalities!r}")
        if self.model in ("complex", "rotate") and self.dim % 2:
            raise ValueError(f"--dim must be even for {self.model} (complex coordinates), got {self.dim}")

    def to_dict(self) -> dict:
        return asdict(self)


class KGEModel(nn.Module):
    def __init__(self, cfg: KGEConfig, features: dict[str, np.ndarray] | None = None):
        super().__init__()
        from otmel.kge.fusion import Fusion

        self.cfg = cfg
        self.entity = nn.Embedding(cfg.num_entities, cfg.dim)
        nn.init.normal_(self.entity.weight, std=cfg.init_scale)
        self.used = MODALITY_CHOICES[cfg.modalities]
        self.fusion = None
        for k in self.used:
            if features is None or k not in features:
                raise ValueError(f"--modalities {cfg.modalities} needs {k} features (--features)")
            self.register_buffer(f"feat_{k}", torch.as_tensor(features[k], dtype=torch.float32))
        if self.used:
            self.fusion = Fusion(cfg.fusion, cfg.dim, {k: cfg.modal_dims.get(k) or features[k].shape[1]
                                                        for k in self.used}, cfg.ot_epsilon, cfg.ot_iters)
        out_dim = self.fusion.out_dim if self.fusion is not None else cfg.dim
        self.relation = nn.Embedding(2 * cfg.num_relations, relations.relation_dim(cfg.model, out_dim))
        if cfg.model == "rotate":  # phases
            nn.init.uniform_(self.relation.weight, -np.pi, np.pi)
        else:  # the recipe's small init (ComplEx, TransE)
            nn.init.normal_(self.relation.weight, std=cfg.init_scale)

    def features(self) -> dict[str, Tensor]:
        return {k: getattr(self, f"feat_{k}") for k in self.used}

    def entity_table(self) -> Tensor:
        """The unified entity embeddings E_F (N, D): fused, or E_S for the structural model."""
        if self.fusion is None:
            return self.entity.weight
        return self.fusion(self.entity.weight, self.features())

    def forward(self, heads: Tensor, rels: Tensor, table: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Scores of (head, relation, every entity) (B, N) and the factors N3 regularises."""
        table = self.entity_table() if table is None else table
        h, r = table[heads], self.relation(rels)
        q = relations.query(self.cfg.model, h, r)
        return relations.score(self.cfg.model, q, table), (h, r)

    def score_triples(self, triples: Tensor, table: Tensor | None = None) -> Tensor:
        table = self.entity_table() if table is None else table
        h, r, t = table[triples[:, 0]], self.relation(triples[:, 1]), table[triples[:, 2]]
        q = relations.query(self.cfg.model, h, r)
        return relations.score_pairs(self.cfg.model, q, t[:, None, :])[:, 0]
