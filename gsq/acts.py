"""The hidden states of the calibration (and perplexity-watch) windows between decoder layers: this rank's
share, in blocks, where the memory plan puts them, and the resume point after every layer.

Windows are grouped in blocks of BLOCK consecutive windows; block b belongs to rank b % ranks. A block is
the unit of every layer pass (one forward call), so a window's states are computed the same way whatever
the number of ranks. Placement (`--activations`):

- device / host: the blocks are tensors in GPU or host memory, overwritten in place as a layer passes
  (no second copy); after each layer they are also written to `acts-<layer>/` as the resume point.
- disk: the blocks are safetensors files; layer i reads `acts-<i>/` and writes `acts-<i+1>.tmp/`, which
  becomes the resume point when the layer is done. Memory holds one block at a time; the files' pages
  are the kernel's to drop.

A layer's resume point `WORK/acts-<i>/<kind>-<block>.safetensors` is complete once the directory has its
final name (renamed by rank 0 when every rank has written its blocks); state.json then points at it.
"""

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gsq import dist
from gsq.errors import writing

BLOCK = 4  # windows per block


def blocks_of(n_windows: int, rank: int, ranks: int) -> list:
    return [b for b in range(-(-n_windows // BLOCK)) if b % ranks == rank]


def rank_windows(n_windows: int, rank: int, ranks: int) -> int:
    """How many of `n_windows` windows rank `rank` holds."""
    return sum(min(BLOCK, n_windows - b * BLOCK) for b in blocks_of(n_windows, rank, ranks))


class Activations:
    """This rank's blocks of the hidden states `[windows, seqlen, hidden]` of one kind of windows."""

    def __init__(self, kind: str, shape: tuple, placement: str, device, dtype, work: Path):
        """`shape`: (windows, seqlen, hidden) of all ranks' windows together."""
        self.kind, self.shape, self.placement, self.device, self.dtype, self.work = \
            kind, shape, placement, torch.device(device), dtype, work
        self.n = n_windows = shape[0]
        self.blocks = blocks_of(n_windows, dist.rank(), dist.world())
        self.memory = {}  # device / host: block -> tensor
        self.src = self.dst = None  # disk: the directories read and written by the current layer
        self.fresh = set()  # disk: blocks the current layer has written already (read back from dst)

    def windows(self, b: int) -> slice:
        return slice(b * BLOCK, min(self.n, (b + 1) * BLOCK))

    def rows(self) -> list:
        """Indices of the windows this rank holds."""
        return [w for b in self.blocks for w in range(self.n)[self.windows(b)]]

    def resident_bytes(self) -> int:
        """Bytes of layer inputs this rank holds (in memory, or on disk for `disk`)."""
        return len(self.rows()) * self.shape[1] * self.shape[2] * self.dtype.itemsize

    def begin(self, layer: int):
        """Layer `layer` starts: it reads the states at its input and writes those at its output."""
        if self.placement == "disk":
            self.src = self.work / f"acts-{layer}"
            self.dst = self.work / f"acts-{layer + 1}.tmp"
            self.dst.mkdir(parents=True, exist_ok=True)
            self.fresh = set()

    def get(self, b: int, dtype=None) -> torch.Tensor:
        """Block b on the compute device, in `dtype` (default: the storage dtype)."""
        if self.placement == "disk":
            where = self.dst if b in self.fresh else self.src
            t = load_file(where / self._file(b))["h"]
        else:
            t = self.memory[b]
        return t.to(self.device, dtype or self.dtype)

    def put(self, b: int, h: torch.Tensor):
        if self.placement == "disk":
            with writing(self.dst / self._file(b), h.numel() * self.dtype.itemsize):
                save_file({"h": h.to("cpu", self.dtype).contiguous()}, self.dst / self._file(b))
            self.fresh.add(b)
        else:
            self.memory[b] = h.to(self.device if self.placement == "device" else "cpu", self.dtype)

    def save(self, layer: int):
        """Write this rank's blocks as the resume point before `layer` (into `acts-<layer>.tmp/`)."""
        tmp = self.work / f"acts-{layer}.tmp"
        if self.placement != "disk":
            tmp.mkdir(parents=True, exist_ok=True)
            for b in self.blocks:
                with writing(tmp / self._file(b), self.memory[b].numel() * self.memory[b].element_size()):
                    save_file({"h": self.memory[b].to("cpu").contiguous()}, tmp / self._file(b))
        self.src, self.dst, self.fresh = self.work / f"acts-{layer}", None, set()

    def load(self, layer: int):
        """Take up the resume point before `layer`."""
        self.src = self.work / f"acts-{layer}"
        if self.placement != "disk":
            for b in self.blocks:
                self.put(b, load_file(self.src / self._file(b))["h"])

    def scratch(self) -> dict:
        """A copy of the blocks in memory (the perplexity watch runs the rest of the model on it)."""
        where = self.device if self.placement == "device" else torch.device("cpu")
        return {b: self.get(b).to(where, copy=True) for b in self.blocks}

    def _file(self, b: int) -> str:
        return f"{self.kind}-{b:06d}.safetensors"


def commit(work: Path, layer: int, stores: list):
    """Every rank has written its blocks of the resume point before `layer`: rank 0 gives the directory
    its final name (state.json is written next, then older points are removed by `drop_old`)."""
    for s in stores:
        s.save(layer)
    dist.barrier()
    if dist.is_writer():
        final, tmp = work / f"acts-{layer}", work / f"acts-{layer}.tmp"
        if final.exists():
            shutil.rmtree(final)
        tmp.mkdir(parents=True, exist_ok=True)  # (a rank may hold no block of a tiny set)
        tmp.rename(final)
    dist.barrier()


def drop_old(work: Path, keep: int, unfinished: bool = False):
    """Remove the resume points before `acts-<keep>` (rank 0, once state.json points at it); with
    `unfinished`, also every later one (on resume: what an interrupted layer had begun to write)."""
    for d in work.glob("acts-*"):
        n = int(d.name.split("-")[1].split(".")[0])
        if n < keep or (unfinished and d.name != f"acts-{keep}"):
            shutil.rmtree(d, ignore_errors=True)
