"""Training OTKGE models (``otmel kge train``), their checkpoints, and entity-embedding export.

Two losses:
* ``ce`` (default): the strong-baseline recipe of Lacroix et al. (2018) that the OTKGE release
  builds on: reciprocal relations (every triple also as (t, r^-1, h)), 1-N scoring of each
  query against every entity with cross-entropy on the true tail, N3 regularisation of the
  query's factors, Adagrad. On WN9-IMG-like graphs this reaches a filtered MRR ~0.9.
* ``logistic``: the paper's eq. 6, log(1 + exp(-y f)) on the observed triples (y = 1) and
  ``--negatives`` uniformly corrupted tails per triple (y = -1), with reciprocals so heads
  are corrupted too.

Single process, GPU when present. Checkpoint directory (local or s3://): ``config.json``
(model + training settings), ``model.safetensors`` (all weights and the modal feature
buffers), ``entities.txt`` / ``relations.txt`` (the id order), ``metrics.json`` (per-epoch
validation and the final filtered test metrics), ``checksums.json`` (written last; verified
on load).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from otmel.kge import relations
from otmel.kge.data import KGData
from otmel.kge.model import KGEConfig, KGEModel

log = logging.getLogger(__name__)

LOSSES = ("ce", "logistic")
OPTIMIZERS = ("adagrad", "adam")


@dataclass
class KGETrainConfig:
    triples: str  # directory with train / valid / test
    out: str  # checkpoint directory (local or s3://)
    model: str = "complex"
    modalities: str = "structure"
    fusion: str = "ot"
    features: str | None = None  # Parquet: entity_id + ling / visual vectors
    entity_map: str | None = None  # name<TAB>entity_id, when the triples use other names
    dim: int = 400
    epochs: int = 50
    batch_size: int = 1000
    lr: float = 0.1
    optimizer: str = "adagrad"
    loss: str = "ce"
    reg: float = 0.05  # N3 weight
    negatives: int = 64  # logistic loss: corrupted tails per triple
    eval_every: int = 5  # epochs between validation MRRs (0: none); the best epoch is kept
    seed: int = 0
    device: str | None = None  # None: cuda when present
    s3_endpoint: str | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.dim < 2:
            raise ValueError("--epochs, --batch-size must be >= 1 and --dim >= 2")
        if self.modalities != "structure" and not self.features:
            raise ValueError(f"--modalities {self.modalities} needs --features URI (entity_id + ling/visual vectors)")


def _device(cfg: KGETrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(cfg: KGETrainConfig) -> tuple[KGData, KGEModel]:
    from otmel.kge.data import load_features, load_triples, read_entity_map
    from otmel.kge.fusion import prepare_features
    from otmel.kge.model import MODALITY_CHOICES

    data = load_triples(cfg.triples, cfg.s3_endpoint, read_entity_map(cfg.entity_map, cfg.s3_endpoint))
    features = None
    used = MODALITY_CHOICES[cfg.modalities] if cfg.modalities in MODALITY_CHOICES else ()
    if used:
        loaded = load_features(cfg.features, data.entities, used, cfg.s3_endpoint)
        features = {k: prepare_features(m) for k, m in loaded.matrices.items()}
    kcfg = KGEConfig(num_entities=data.num_entities, num_relations=data.num_relations, model=cfg.model, dim=cfg.dim,
                     modalities=cfg.modalities, fusion=cfg.fusion,
                     modal_dims={k: int(v.shape[1]) for k, v in (features or {}).items()})
    torch.manual_seed(cfg.seed)
    return data, KGEModel(kcfg, features)


def _optimizer(cfg: KGETrainConfig, model: KGEModel):
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=cfg.lr)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def _step_loss(cfg: KGETrainConfig, model: KGEModel, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    table = model.entity_table()
    if cfg.loss == "ce":
        scores, (h, r) = model(batch[:, 0], batch[:, 1], table)
        fit = torch.nn.functional.cross_entropy(scores, batch[:, 2])
        factors = (h, table[batch[:, 2]]) if model.cfg.model == "rotate" else (h, r, table[batch[:, 2]])
        return fit + cfg.reg * relations.n3(model.cfg.model, *factors)
    # logistic (eq. 6): the true tail and uniformly drawn ones
    n = model.cfg.num_entities
    neg = torch.randint(0, n, (len(batch), cfg.negatives), generator=generator, device=batch.device)
    cand = torch.cat([batch[:, 2:3], neg], dim=1)
    h, r = table[batch[:, 0]], model.relation(batch[:, 1])
    q = relations.query(model.cfg.model, h, r)
    f = relations.score_pairs(model.cfg.model, q, table[cand])
    y = torch.cat([torch.ones(len(batch), 1), -torch.ones(len(batch), cfg.negatives)], dim=1).to(f)
    fit = torch.nn.functional.softplus(-y * f).mean()
    factors = (h, table[batch[:, 2]]) if model.cfg.model == "rotate" else (h, r, table[batch[:, 2]])
    return fit + cfg.reg * relations.n3(model.cfg.model, *factors)


def train(cfg: KGETrainConfig, progress=None) -> dict:
    """Train, keep the best epoch by validation MRR (the last without a valid split or with
    ``eval_every`` 0), write the checkpoint, and return its filtered test metrics."""
    from otmel.kge.data import with_reciprocals
    from otmel.kge.evaluation import evaluate

    data, model = build(cfg)
    device = _device(cfg)
    model.to(device)
    train_q = torch.as_tensor(with_reciprocals(data.splits["train"], data.num_relations), device=device)
    opt = _optimizer(cfg, model)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    has_valid = len(data.splits.get("valid", ())) > 0
    history, best, best_state = [], -1.0, None
    log.info("kge: %s", json.dumps(data.summary()))
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train_q), generator=gen).to(device)
        total, steps = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            batch = train_q[order[start:start + cfg.batch_size]]
            loss = _step_loss(cfg, model, batch, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        entry = {"epoch": epoch, "loss": total / max(steps, 1), "seconds": time.perf_counter() - t0}
        last = epoch == cfg.epochs - 1
        if has_valid and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
            entry["valid"] = evaluate(model, data, "valid")
            if entry["valid"]["mrr"] > best:
                best = entry["valid"]["mrr"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(entry)
        if progress:
            progress(entry)
        log.info("kge epoch %d: %s", epoch, json.dumps(entry))
    if best_state is not None:
        model.load_state_dict(best_state)
    metrics = {"test": evaluate(model, data, "test") if len(data.splits.get("test", ())) else None,
               "best_valid_mrr": best if best_state is not None else None, "history": history,
               "data": data.summary()}
    if model.fusion is not None:
        metrics["lambdas"] = dict(zip(("structure", *model.used), model.fusion.lambdas().tolist()))
    save_checkpoint(model, data, cfg, metrics, cfg.out, cfg.s3_endpoint)
    return metrics


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: KGEModel, data: KGData, cfg: KGETrainConfig, metrics: dict, out: str,
                    s3_endpoint: str | None = None) -> None:
    import tempfile

    from safetensors.torch import save_file

    from otmel.io.integrity import write_checksums
    from otmel.io.storage import is_remote, upload_dir

    def write(d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({"model": model.cfg.to_dict(), "train": asdict(cfg)}, indent=2))
        (d / "entities.txt").write_text("\n".join(data.entities) + "\n")
        (d / "relations.txt").write_text("\n".join(data.relations) + "\n")
        (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_checksums(d)

    if is_remote(out):
        with tempfile.TemporaryDirectory(prefix="otmel-kge-") as tmp:
            write(Path(tmp))
            upload_dir(tmp, out, s3_endpoint)
    else:
        write(Path(out))


def load_checkpoint(uri: str, s3_endpoint: str | None = None, device: str = "cpu") -> tuple[KGEModel, list[str], list[str]]:
    """(model, entities, relations) of a checkpoint, its checksums verified."""
    from safetensors.torch import load_file

    from otmel.io.integrity import verify_checksums
    from otmel.io.storage import local_copy

    with local_copy(uri, s3_endpoint) as d:
        verify_checksums(d)
        conf = json.loads((d / "config.json").read_text())
        state = load_file(str(d / "model.safetensors"), device=device)
        entities = (d / "entities.txt").read_text().splitlines()
        rels = (d / "relations.txt").read_text().splitlines()
    kcfg = KGEConfig(**conf["model"])
    features = {k[len("feat_"):]: v.numpy() for k, v in state.items() if k.startswith("feat_")}
    model = KGEModel(kcfg, features or None)
    model.load_state_dict(state)
    model.eval()
    return model, entities, rels


def entity_embeddings(model: KGEModel, entities: list[str]):
    """The unified entity embeddings as a table (entity_id, vector) for linking."""
    import pyarrow as pa

    with torch.no_grad():
        table = model.entity_table().float().cpu().numpy()
    return pa.table({"entity_id": pa.array(entities, pa.string()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(table.reshape(-1), pa.float32()),
                                                                 table.shape[1])})
