"""2 gloo workers with global in-batch negatives == 1 process on the concatenated batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import make_model, random_inputs

IDS = ["a", "b", "c", "b", "d", "a"]  # gold copies sit on the other worker: masked there too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(mode: str):
    model, _ = make_model(mode, missing_image="mask", seed=0)
    model.train()
    m, e = random_inputs(6, seed=1), random_inputs(6, seed=2)
    out = model(m, e, IDS)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in out.items()}, grads


def _worker(rank: int, world: int, port: int, mode: str, result_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from otmel.training.distributed import make_entity_gather

        model, _ = make_model(mode, missing_image="mask", seed=0)
        model.train()
        ddp = DDP(model, find_unused_parameters=True)
        m, e = random_inputs(6, seed=1), random_inputs(6, seed=2)
        sl = slice(rank * 3, rank * 3 + 3)
        local = lambda x: {k: v[sl] for k, v in x.items()}  # noqa: E731
        out = ddp(local(m), local(e), IDS[sl], gather=make_entity_gather())
        (out["loss"] * world).backward()  # DDP averages: scale back to the sum
        torch.save({"losses": {k: float(v) for k, v in out.items()},
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["kd", "ot"])
def test_two_workers_equal_one_process(mode, tmp_path):
    expected_losses, expected_grads = _single(mode)
    mp.start_processes(_worker, args=(2, _free_port(), mode, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in expected_losses.items():
        total = sum(r["losses"][key] for r in results)
        assert total == pytest.approx(value, abs=1e-5, rel=1e-5), key
    for r in results:  # DDP leaves every rank with the same, averaged gradient
        assert set(r["grads"]) == set(expected_grads)
        for name, g in expected_grads.items():
            torch.testing.assert_close(r["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)
