"""Data and expert parallelism over torch.distributed: under `torchrun --nproc-per-node N -m gsq.quantize ...`
every rank streams the same layers and holds 1/N of the calibration windows (gsq.acts); the routed
experts of each MoE layer are split across the ranks balanced by routed-token count, every token is sent
to the ranks owning its top-k experts (`exchange`, all-to-all), each rank optimises its own experts, and
the results are gathered so that every rank passes the same quantized layer on its windows. Rank 0
writes the checkpoint. NCCL on GPUs, gloo on CPUs. Without torchrun (no WORLD_SIZE) all of this is a
single process and `exchange` hands the tokens back as they are.

Every expert's result depends only on its (layer, expert) seed and the tokens it receives, which reach
it in a canonical order (by position in the minibatch), not on which experts share its batch or its
rank, so the checkpoint is byte-identical whatever the number of ranks.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from gsq.errors import InputError


def init(device_name: str) -> str:
    """Join the torchrun job, if any; the device this rank computes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return device_name
    cuda = device_name.startswith("cuda")
    if cuda:
        device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device_name)
    # the other ranks wait in the next collective while rank 0 writes and measures perplexity: be patient
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))
    return device_name


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_writer() -> bool:
    return rank() == 0


def assign(counts: list, experts: list, ranks: int) -> list:
    """Experts per rank, balanced by routed tokens: the largest first, each to the least loaded rank
    (ties to the lowest rank). Deterministic, the same on every rank."""
    load = [0] * ranks
    mine = [[] for _ in range(ranks)]
    for e in sorted(experts, key=lambda e: (-counts[e], e)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        mine[r].append(e)
        load[r] += counts[e]
    return [sorted(m) for m in mine]


def gather(local: dict) -> dict:
    """Union of every rank's {key: value} (CPU tensors inside); identity on a single process."""
    if world() == 1:
        return dict(local)
    parts = [None] * world()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def exchange(rows: torch.Tensor, meta: torch.Tensor, counts: list) -> tuple:
    """All-to-all: `rows[n, H]` and their `meta[n, m]` (int64), sorted by destination, `counts[r]` of them
    for rank r; returns what every rank sent to this one, concatenated in rank order."""
    if world() == 1:
        return rows, meta
    send = torch.tensor(counts, dtype=torch.int64, device=rows.device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    recv = recv.tolist()
    out_rows = rows.new_empty((sum(recv), rows.shape[1]))
    out_meta = meta.new_empty((sum(recv), meta.shape[1]))
    dist.all_to_all_single(out_rows, rows.contiguous(), recv, counts)
    dist.all_to_all_single(out_meta, meta.contiguous(), recv, counts)
    return out_rows, out_meta


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over the ranks (exact for integers)."""
    if world() > 1:
        dist.all_reduce(t)
    return t


def barrier():
    if world() > 1:
        dist.barrier()


def on_writer(fn, *args):
    """Run fn on rank 0 only and hand its result, or its InputError, to every rank."""
    if world() == 1:
        return fn(*args)
    box = [None]
    if is_writer():
        try:
            box[0] = ("ok", fn(*args))
        except InputError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise InputError(value)
    return value


def finish():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
