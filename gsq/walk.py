"""Walk a model layer by layer, as quantization (gsq.pipeline) and pruning (gsq.prune) both do:

    source = Source(path, device, seqlen=...)   config.json only: every check that needs no weight
    source.open()                               the shards: whole, decodable, shaped as config.json says
    source.load_globals()                       embeddings, final norm, lm_head: what runs outside the layers
    start = begin(source, work, [(store, ids)], point)     embed the windows, or take up a resume point
    for i in range(start, layers):
        with source.layer(i) as layer:          layer i read from the shards, freed after
            ... what the tool does to the layer, and the windows' states passed on

Also the process's host-memory housekeeping: glibc's allocator settings and the resident-set figures that
every run record reports.
"""

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from gsq import acts, adapter, dist, stream
from gsq.eval import check_model_dir, model_config


def dtypes(tcfg, device):
    """(model dtype, compute dtype of the layers). On a CPU the layers run in float32: bf16 matmuls there
    go through oneDNN, which keeps state for every new shape (MoE token counts make every shape new) and
    grows the process layer by layer; float32 is also no slower there. GSQ's own steps stay in the model
    dtype, and activations are stored in it."""
    dtype = stream.model_dtype(tcfg)
    return dtype, torch.float32 if device.type == "cpu" else dtype


class Source:
    """A model directory opened for streaming: its config, architecture row (gsq.adapter), the model's
    skeleton on the meta device and, once `open`, its shards."""

    def __init__(self, path: str, device, **seqlens):
        """`seqlens`: the window lengths the run will feed (refused beyond the model's context)."""
        self.path = check_model_dir(path)
        self.config = model_config(self.path)
        self.arch = adapter.arch_of(self.config)
        self.text = adapter.text_config(self.config)
        adapter.check_context(self.text, **seqlens)
        self.model = stream.skeleton(self.text)
        self.device = device
        self.dtype, self.compute = dtypes(self.text, device)
        self.ckpt = None

    @property
    def n_layers(self) -> int:
        return len(self.model.model.layers)

    def open(self):
        self.ckpt = stream.Checkpoint(self.path)
        stream.check_shapes(self.ckpt, self.model, self.arch)

    def load_globals(self):
        stream.load_globals(self.ckpt, self.model, self.arch, self.device, self.compute)

    @contextmanager
    def layer(self, i: int):
        """Decoder layer i, loaded from the shards in the compute dtype; freed (and the freed host pages
        handed back) when the block ends."""
        layer = stream.load_layer(self.ckpt, self.model, self.arch, i, self.device, self.compute)
        try:
            yield layer
        finally:
            del layer
            stream.unload_layer(self.model, i)
            release_host_memory()

    @torch.no_grad()
    def embed(self, store: acts.Activations, ids: torch.Tensor):
        """The windows `ids` embedded into `store` (this rank's blocks)."""
        store.begin(-1)
        for b in store.blocks:
            store.put(b, adapter.embed(self.model, ids[store.windows(b)].to(self.device)))


def begin(source: Source, work: Path, stores: list, point: dict | None) -> int:
    """The first layer to run: 0 once the windows of each (store, ids) in `stores` are embedded and
    committed as the resume point before layer 0; else the resume point `point`'s layer, taken up."""
    if point is None:
        for store, ids in stores:
            source.embed(store, ids)
        acts.commit(work, 0, [store for store, _ in stores])
        return 0
    start = point["next_layer"]
    if dist.is_writer():
        acts.drop_old(work, start, unfinished=True)  # what an interrupted layer had begun to write
    dist.barrier()
    for store, _ in stores:
        store.load(start)
    return start


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def map_large_host_buffers():
    """Have glibc map every host buffer of 8 MiB or more on its own and unmap it when freed. By
    default it raises that threshold each time such a buffer is freed and then serves the GPTQ and
    scale-search temporaries from its heap, which fragments: the peak grew by hundreds of MB. (At
    1 MiB GSQ's per-step buffers would be mapped too, and the run took 60% longer.)"""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD


def release_host_memory():
    """Hand freed heap pages back to the OS after a layer (glibc keeps them per thread arena
    otherwise, and the process would grow with the number of layers)."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def current_rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        return float("nan")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
