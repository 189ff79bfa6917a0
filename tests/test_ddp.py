"""A binarized model trains under DistributedDataParallel and under FSDP2 (``fully_shard``) (gloo, 2 CPU
processes on 127.0.0.1) exactly as one process over the same global batch: same losses and parameters
to float tolerance.

``bitfx.distill`` wraps the student in DDP when ``torch.distributed`` is initialised; each process
passes its half of every global batch. Every loss term is a mean over elements, so the mean of the
two processes' losses is the one-process loss and DDP's averaged gradient is the one-process one.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bitfx
from bitfx.models import tiny_bert

STEPS = 4
WORLD = 2


def setup():
    torch.manual_seed(0)
    model, example = tiny_bert(layers=1, seq=8)
    model.eval()
    student = bitfx.binarize(model, example, "bipft")
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(2, 1000, (8, 8), generator=g), torch.ones(8, 8, dtype=torch.long))
               for _ in range(STEPS)]
    return model, student, batches


def train(student, model, batches, parallel="ddp"):
    initial = {n: p.detach().clone() for n, p in student.named_parameters()}
    bitfx.distill(student, model, batches, steps=STEPS, lr=1e-2, schedule="constant", progress=False,
                  log_every=1, parallel=parallel)
    params = {n: p.detach().clone() for n, p in student.named_parameters()}
    moved = max(float((params[n] - initial[n]).abs().max()) for n in params)
    return params, student.bitfx_distill_log, moved, student.bitfx_distill_world


def worker(rank, port, out, parallel):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, student, batches = setup()
        half = batches[0][0].shape[0] // WORLD
        shard = [tuple(t[rank * half:(rank + 1) * half] for t in b) for b in batches]
        params, log, _, world = train(student, model, shard, parallel)
        torch.save({"params": params, "log": log, "world": world}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three processes each capture and train the model (~25 s of CPU)
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ddp_two_processes_match_one(tmp_path, parallel):
    mp.spawn(worker, args=(free_port(), str(tmp_path), parallel), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model, student, batches = setup()
    params, log, moved, world = train(student, model, batches)

    assert world == 1 and [r["world"] for r in ranks] == [WORLD] * WORLD  # the workers ran under DDP
    assert len(log) == STEPS
    for step in range(STEPS):
        for term in ("loss", "output", "hidden", "attention"):
            mean = sum(r["log"][step][term] for r in ranks) / WORLD
            assert mean == pytest.approx(log[step][term], rel=1e-4, abs=1e-7), (step, term)
    for name, p in params.items():
        for r in ranks:  # DDP keeps the replicas identical; FSDP gathers the same full parameters
            assert torch.equal(r["params"][name], ranks[0]["params"][name]), name
        assert torch.allclose(ranks[0]["params"][name], p, rtol=1e-4, atol=1e-5), name
    assert moved > 1e-3  # the run trained: parameters moved by many times the tolerance
