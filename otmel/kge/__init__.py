"""OTKGE (Cao et al., NeurIPS 2022): multimodal knowledge-graph embeddings fused by optimal
transport, as an entity channel for linking.

One module per concept of the paper, no Ray (single process: the entity table and the
per-step OT over embedding dimensions make data-parallel training a poor fit):

* :mod:`otmel.kge.data` - triples in the common text format, entity/relation vocabularies,
  filtered-ranking filters, per-entity modal features;
* :mod:`otmel.kge.relations` - the relation transforms ComplEx / RotatE / TransE (eq. 4-5)
  and the N3 regulariser;
* :mod:`otmel.kge.fusion` - Algorithm 1: OT between embedding DIMENSIONS of each modality
  and of the structural space (``otmel.model.ot.sinkhorn``), the barycentric mapping of eq. 2 with
  a learnable Delta_T, the lambda-weighted fusion of eq. 3; and the ``mean`` / ``concat``
  ablations (a learned linear projection instead of the OT alignment);
* :mod:`otmel.kge.model` - the model: structural embeddings, relations (with reciprocals),
  the fusion, scores against every entity;
* :mod:`otmel.kge.training` - 1-N cross-entropy + N3 (the strong baseline recipe) or the
  paper's logistic loss with negative sampling (eq. 6), Adagrad/Adam, checkpoints;
* :mod:`otmel.kge.evaluation` - filtered ranking in both directions: MRR, H@1/3/10;
* :mod:`otmel.kge.synth` - a generated KG with WordNet-like relation patterns and features
  that carry (or do not carry) signal, for tests and benchmarks.
"""
