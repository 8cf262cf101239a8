"""OT-MEL: the whole model, its config, and checkpoint save/load.

Three calls serve every job:

* :meth:`OTMEL.encode` (inputs) -> features dict, the same for mentions and entities (one
  shared encoder, eq. 4-5): token features, fused pooled vectors, summary vectors t/v and the
  stage-1 retrieval vectors (see :data:`FEATURE_SHAPES`);
* :meth:`OTMEL.score` (mention features, entity features) -> :class:`MatchScores`, for a
  (mentions x entities) grid or for per-mention candidate lists;
* :meth:`OTMEL.forward` (mention inputs, entity inputs, ids) -> losses, for training.

Modes (DESIGN.md): ``ot`` (OT-MEL(OT): Sinkhorn everywhere), ``att`` (the ATT baseline),
``kd`` (OT-MEL(KD): training forward and losses use the OT assignments, the attention
assignments from the same Q/K are distilled towards the detached plans, J = L + L_KD
(eq. 29); inference uses attention only).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from otmel.model.correlation import CorrelationAssignment, UnimodalProjection
from otmel.model.features import (  # noqa: F401 - the feature contract, re-exported
    ENTITY_FEATURES, FEATURE_NAMES, FEATURE_SHAPES, KEY_FEATURES, MENTION_FEATURES, key_features_of, retrieval_key_of,
)
from otmel.model.config import MODES, ModelConfig  # noqa: F401 - re-exported beside the model
from otmel.model.encoders import CLIPFeatureEncoder, load_clip
from otmel.model.losses import allowed_columns, distillation_kl, matching_losses
from otmel.model.matching import MatchScores, fused_score, overall_score, summary_score, unimodal_score
from otmel.model.pooling import make_pool

log = logging.getLogger(__name__)


class OTMEL(nn.Module):
    """OT-MEL (Zhang et al., ACL Findings 2024) with the departures listed in DESIGN.md."""

    def __init__(self, config: ModelConfig, clip_model: nn.Module | None = None):
        super().__init__()
        self.config = config
        if clip_model is None:
            if config.clip_config is not None:
                from transformers import CLIPConfig

                clip_model = load_clip(config=CLIPConfig(**config.clip_config))
            else:
                clip_model = load_clip(config.clip)
        W, d = config.input_width, config.dim
        P = clip_model.config.projection_dim
        self.encoder = CLIPFeatureEncoder(clip_model, W, config.missing_image)
        # eqs 6-12: image->text (queries: text tokens) and text->image (queries: patches)
        self.vision_to_text = CorrelationAssignment(W, W, d)
        self.text_to_vision = CorrelationAssignment(W, W, d)
        # The set {T_m, G_m^{v->t}} of eq. 13 mixes token features (width W) and transported
        # features (width d); the paper writes both in R^d. We map the tokens to d with a
        # learned linear layer so they can be pooled together.
        self.text_to_dim = nn.Linear(W, d)
        self.vision_to_dim = nn.Linear(W, d)
        self.pool_text = make_pool(config.pooling, d)  # eq. 13 / 16
        self.pool_vision = make_pool(config.pooling, d)  # eq. 15 / 17
        # eqs 19-24: unimodal matching projections and poolings
        self.text_unimodal = UnimodalProjection(W, d)
        self.vision_unimodal = UnimodalProjection(W, d)
        self.pool_text_unimodal = make_pool(config.pooling, d)  # eq. 23
        self.pool_vision_unimodal = make_pool(config.pooling, d)
        # t_e, v_e are CLIP's P-dim summaries; eq. 24 pairs them with the d-dim pooled g_m
        self.text_summary_to_dim = nn.Linear(P, d, bias=False)
        self.vision_summary_to_dim = nn.Linear(P, d, bias=False)
        #: set by the ONNX exporter to export a kd model's OT teacher path
        self.inference_method: str | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def projection_dim(self) -> int:
        return self.encoder.clip.config.projection_dim

    @property
    def num_vision_tokens(self) -> int:
        return self.encoder.num_vision_tokens

    def assignment_method(self) -> str:
        """"ot" or "att" for the current mode and train/eval state."""
        if self.inference_method is not None and not self.training:
            return self.inference_method
        if self.config.mode == "ot":
            return "ot"
        if self.config.mode == "att":
            return "att"
        return "ot" if self.training else "att"  # kd: OT teacher in training only

    def _distilling(self) -> bool:
        return self.config.mode == "kd" and self.training

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        has_image: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Features of a batch of mentions or entities (see :data:`FEATURE_SHAPES`)."""
        features, _ = self._encode(input_ids, attention_mask, pixel_values, has_image)
        return features

    def _encode(self, input_ids, attention_mask, pixel_values, has_image):
        cfg = self.config
        method = self.assignment_method()
        distill = self._distilling()
        tf = self.encoder(input_ids, attention_mask, pixel_values, has_image)
        T, V = tf.text_tokens, tf.vision_tokens  # (B, Lt, W), (B, Lv, W)
        tmask, vmask = tf.text_mask, tf.vision_mask  # (B, Lt), (B, Lv)

        # multimodal correlation assignment (eqs 6-12), both directions
        a_vt = self.vision_to_text(T, tmask, V, vmask, method, cfg.ot_epsilon, cfg.ot_iters, distill)
        a_tv = self.text_to_vision(V, vmask, T, tmask, method, cfg.ot_epsilon, cfg.ot_iters, distill)
        G_vt, G_tv = a_vt.transported, a_tv.transported  # (B, Lt, d), (B, Lv, d)

        # softpool over {T, G^{v->t}} and {V, G^{t->v}} (eqs 13-17)
        has_v = vmask.any(-1, keepdim=True)  # (B, 1): rows with a (real) image
        has_t = tmask.any(-1, keepdim=True)
        text_set = torch.cat([self.text_to_dim(T), G_vt], dim=1)  # (B, 2Lt, d)
        text_set_mask = torch.cat([tmask, tmask & has_v], dim=1)  # (B, 2Lt)
        vision_set = torch.cat([self.vision_to_dim(V), G_tv], dim=1)  # (B, 2Lv, d)
        vision_set_mask = torch.cat([vmask, vmask & has_t], dim=1)  # (B, 2Lv)
        g_t = self.pool_text(text_set, text_set_mask)  # (B, d)
        g_v = self.pool_vision(vision_set, vision_set_mask)  # (B, d)
        fused = torch.cat([g_t, g_v], dim=-1)  # (B, 2d)

        tq, tk, tv = self.text_unimodal(T)  # (B, Lt, d) x3
        vq, vk, vv = self.vision_unimodal(V)  # (B, Lv, d) x3
        t, v = tf.text_summary, tf.vision_summary  # (B, P)
        query, key = self.retrieval_vectors(g_t, g_v, t, v, has_image)
        features = {
            "text_mask": tmask,
            "vision_mask": vmask,
            "has_image": has_image.bool(),
            "text_query": tq,
            "text_key": tk,
            "text_value": tv,
            "vision_query": vq,
            "vision_key": vk,
            "vision_value": vv,
            "text_summary": t,
            "vision_summary": v,
            "fused": fused,
            "retrieval_query": query,
            "retrieval_key": key,
        }
        kd_assignments = [a_vt, a_tv] if distill else []
        return features, kd_assignments

    def retrieval_vectors(self, g_t, g_v, t, v, has_image) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage-1 vectors (DESIGN.md "Retrieval then rerank"): ``q_m . k_e`` is exactly the
        part of S_O each side computes alone, for every pair,

            (S_F + <t_m,t_e>/2 + valid <v_m,v_e>/2) / (2 + valid),

        where ``valid`` says whether S_V counts for the pair (always under ``missing_image =
        zeros``; both sides have an image under ``mask``, where S_O renormalises to
        (S_F + S_T)/2 otherwise).

        zeros: ``q = [g, t/2, v/2] / 3``, ``k = [g, t, v]`` (R = 2d + 2P).

        mask: the text part's factor depends on BOTH sides (1/3 when both have an image,
        1/2 otherwise), a rank-2 table, so the key carries the text block twice, once per
        kind of entity, and the query scales each copy for that kind (R = 3(d + P)):

            q = [a_m T_m, T_m / 2, V_m / 3],   k = [i_e T_e, (1 - i_e) T_e, V_e]
            T_m = [g^t_m, t_m/2], V_m = [g^v_m, v_m/2], T_e = [g^t_e, t_e], V_e = [g^v_e, v_e]

        with ``i = has_image`` and ``a_m = 1/3`` if the mention has an image, else 1/2. The
        visual block is zero whenever a side has no image (masked tokens pool to zero, the
        summary is zeroed), so it never contributes to a pair without S_V. One index serves
        every pair exactly; the price is 1.5x wider stage-1 vectors under ``mask``.

        g_t, g_v : (B, d)   t, v : (B, P)   has_image : (B,)   ->   (query, key), each (B, R)
        """
        if self.config.missing_image == "zeros":
            g = torch.cat([g_t, g_v], dim=-1)  # (B, 2d)
            return torch.cat([g, t * 0.5, v * 0.5], dim=-1) / 3.0, torch.cat([g, t, v], dim=-1)
        image = has_image.bool().to(g_t.dtype)[:, None]  # (B, 1)
        text_m, vision_m = torch.cat([g_t, t * 0.5], dim=-1), torch.cat([g_v, v * 0.5], dim=-1)  # (B, d + P)
        text_e, vision_e = torch.cat([g_t, t], dim=-1), torch.cat([g_v, v], dim=-1)
        a_m = 0.5 - image / 6.0  # 1/3 with an image, 1/2 without
        query = torch.cat([a_m * text_m, 0.5 * text_m, vision_m / 3.0], dim=-1)  # (B, 3(d + P))
        key = torch.cat([image * text_e, (1.0 - image) * text_e, vision_e], dim=-1)  # (B, 3(d + P))
        return query, key

    # ------------------------------------------------------------------ score
    def score(self, mention: dict[str, torch.Tensor], entity: dict[str, torch.Tensor]) -> MatchScores:
        """S_O and its parts for a grid (entity tensors (E, ...)) or candidates ((M, K, ...))."""
        scores, _ = self._score(mention, entity)
        return scores

    def _score(self, mention, entity):
        cfg = self.config
        method = self.assignment_method()
        distill = self._distilling()
        lead = entity["fused"].dim() - 1
        S_F = fused_score(mention["fused"], entity["fused"])  # (M, E|K)
        # t_e, v_e projected to d (eq. 24 pairs them with the pooled g_m): (E|M, [K,] d)
        t_proj = self.text_summary_to_dim(entity["text_summary"])
        v_proj = self.vision_summary_to_dim(entity["vision_summary"])
        S_T, a_t = unimodal_score(
            mention["text_key"], mention["text_value"], mention["text_mask"], mention["text_summary"],
            entity["text_query"], entity["text_mask"], entity["text_summary"], t_proj,
            self.pool_text_unimodal, method, cfg.ot_epsilon, cfg.ot_iters, distill,
        )
        S_V, a_v = unimodal_score(
            mention["vision_key"], mention["vision_value"], mention["vision_mask"], mention["vision_summary"],
            entity["vision_query"], entity["vision_mask"], entity["vision_summary"], v_proj,
            self.pool_vision_unimodal, method, cfg.ot_epsilon, cfg.ot_iters, distill,
        )
        if cfg.missing_image == "mask":
            m_img = mention["has_image"].bool()  # (M,)
            e_img = entity["has_image"].bool()  # (E,) or (M, K)
            valid = m_img[:, None] & (e_img[None, :] if lead == 1 else e_img)  # (M, E|K)
        else:
            valid = torch.ones_like(S_F, dtype=torch.bool)
        S_O = overall_score(S_F, S_T, S_V, valid)
        return MatchScores(S_O, S_F, S_T, S_V, valid), ([a_t, a_v] if distill else [])

    def separable_score(self, mention: dict[str, torch.Tensor], entity: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stage-1 part of S_O (grid or candidates):
        (S_F + <t_m,t_e>/2 + valid <v_m,v_e>/2) / (2 + valid), ``valid`` as in :meth:`score`."""
        S_F = fused_score(mention["fused"], entity["fused"])
        if self.config.missing_image == "mask":
            e_img = entity["has_image"].bool()
            valid = mention["has_image"].bool()[:, None] & (e_img[None, :] if e_img.dim() == 1 else e_img)
        else:
            valid = torch.ones_like(S_F, dtype=torch.bool)
        v = valid.to(S_F.dtype)
        return (S_F + 0.5 * summary_score(mention["text_summary"], entity["text_summary"])
                + v * 0.5 * summary_score(mention["vision_summary"], entity["vision_summary"])) / (2.0 + v)

    # ------------------------------------------------------------------ train
    def forward(self, mention_inputs: dict, entity_inputs: dict, mention_entity_ids: list[str],
                entity_ids: list[str] | None = None, gather=None) -> dict[str, torch.Tensor]:
        """Training step on a batch of (mention, gold entity) pairs: J = L (+ L_KD).

        mention_inputs / entity_inputs: the four encode() inputs, row i of each a pair.
        gather: optional callable (features, entity_ids) -> (global features, global ids,
            offset of this worker's rows, global rows) that concatenates entity features
            across workers, differentiably, with a ``sum_count`` attribute summing a count
            over workers (``otmel.training.distributed.make_entity_gather``); None = single process.
        """
        m_feats, kd_m = self._encode(**mention_inputs)
        e_feats, kd_e = self._encode(**entity_inputs)
        ids = list(entity_ids if entity_ids is not None else mention_entity_ids)
        M = len(mention_entity_ids)
        offset, global_rows = 0, M
        if gather is not None:
            e_feats, ids, offset, global_rows = gather(e_feats, ids)
        target = torch.arange(M, device=m_feats["fused"].device) + offset
        allowed = allowed_columns(list(mention_entity_ids), ids, target).to(target.device)
        scores, kd_u = self._score(m_feats, e_feats)
        losses = matching_losses(scores, target, allowed, global_rows, getattr(gather, "sum_count", None))
        if kd_m or kd_u:
            kd_items = kd_m + kd_e + kd_u  # 4 multimodal + 2 unimodal assignments
            l_kd = sum(distillation_kl(a, self.config.kd_target) for a in kd_items)
            # multimodal KD is per item, local: scale to this worker's share of the batch
            losses["kd"] = l_kd * (M / global_rows)
            losses["loss"] = losses["loss"] + self.config.kd_weight * losses["kd"]
        return losses


# ---------------------------------------------------------------------- checkpoints
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def model_version(model: OTMEL) -> str:
    """sha256 of the weights and the config (DESIGN.md): identifies a trained model."""
    h = hashlib.sha256()
    cfg = dict(model.config.to_dict())
    cfg.pop("extra", None)  # metadata (e.g. the NIL threshold) does not change the model
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(model: OTMEL, out_dir: str | Path, preprocessor=None) -> Path:
    """Write config.json + model.safetensors (+ the preprocessor's tokenizer and
    image-processor files: ``preprocessor.save_pretrained``), then checksums.json (every
    file's size and sha256, verified at load)."""
    from safetensors.torch import save_file

    from otmel.io.integrity import write_checksums

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    cfg = model.config.to_dict()
    cfg["clip_config"] = model.encoder.clip.config.to_dict()
    cfg["format"] = "otmel-checkpoint/1"
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if preprocessor is not None:
        preprocessor.save_pretrained(out)
    write_checksums(out)
    return out


class CheckpointError(ValueError):
    """A directory that is not a loadable otmel checkpoint."""


def load_checkpoint(ckpt_dir: str | Path, map_location: str = "cpu") -> OTMEL:
    """Rebuild the model from config.json (no hub access) and load model.safetensors, after
    checking every file against checksums.json (a modified file is refused, named)."""
    from safetensors.torch import load_file

    from otmel.io.integrity import IntegrityError, verify_checksums

    d = Path(ckpt_dir)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"{d} is not an otmel checkpoint: needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        verify_checksums(d)
    except IntegrityError as exc:
        raise CheckpointError(str(exc)) from None
    raw = json.loads(cfg_path.read_text())
    if raw.get("format") != "otmel-checkpoint/1":
        raise CheckpointError(f"{cfg_path} is not an otmel checkpoint config (format={raw.get('format')!r})")
    config = ModelConfig.from_dict(raw)
    model = OTMEL(config)
    state = load_file(str(w_path), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{w_path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    return model
