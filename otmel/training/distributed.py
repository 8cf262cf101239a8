"""Global in-batch negatives across data-parallel workers.

With N workers each holding B/N (mention, gold entity) pairs, every worker gathers the
entity features of the whole batch so its mentions are contrasted with all B entities, as
the paper's single-GPU batch of 256 does. The gather is differentiable
(``torch.distributed.nn.functional.all_gather``: its backward sums the gradients of every
worker's loss into the owner of each slot), so

    sum over workers of d(loss_w)/d(theta) == d(L)/d(theta) of one process with the whole batch,

where ``loss_w`` is worker w's share of L (its rows divided by the GLOBAL row count, see
``otmel.model.losses.matching_losses``). DDP averages gradients over workers, so the training
step backpropagates ``world_size * loss_w`` to obtain exactly the single-process gradient.

Entity ids are gathered with the features, so an in-batch copy of a row's gold entity
sitting on another worker is masked out of the negatives too.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all_gather of equal-shaped tensors along dim 0."""
    import warnings

    from torch.distributed.nn.functional import all_gather

    if x.dtype == torch.bool:  # masks carry no gradient; gather as uint8
        parts = [torch.empty_like(x, dtype=torch.uint8) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.to(torch.uint8))
        return torch.cat(parts).bool()
    with warnings.catch_warnings():
        # deprecated in favour of a private functional-collectives API; still the public,
        # documented autograd-aware all_gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()))


def make_entity_gather() -> Callable | None:
    """The ``gather`` callable for :meth:`otmel.model.otmel.OTMEL.forward`, or None on one process.

    Every worker must hold the same number of pairs (Ray Train's equal batches; the
    training loop drops the ragged tail).
    """
    rank, size = world()
    if size == 1:
        return None

    def gather(features: dict[str, torch.Tensor], entity_ids: list[str]):
        """-> (global features, global ids, offset of this worker's rows, global rows)."""
        n_local = len(entity_ids)
        counts = [None] * size
        dist.all_gather_object(counts, n_local)
        if len(set(counts)) != 1:
            raise RuntimeError(f"workers hold different batch sizes {counts}: global negatives need equal shards")
        ids: list[list[str]] = [None] * size  # type: ignore[list-item]
        dist.all_gather_object(ids, list(entity_ids))
        gathered = {k: _gather_tensor(v) for k, v in features.items()}
        flat = [e for part in ids for e in part]
        return gathered, flat, rank * n_local, n_local * size

    def sum_count(n: torch.Tensor) -> torch.Tensor:
        """A row count summed over workers (e.g. rows where L_V is defined)."""
        total = n.detach().clone()
        dist.all_reduce(total)
        return total

    gather.sum_count = sum_count  # type: ignore[attr-defined]
    return gather
