"""One pass over a data set that feeds every consumer, on one process or on every rank.

A gallery needs, from the same images, the top-k scan, each channel's statistics, the
accuracy, dissection's thresholds and the statistics of every earlier checkpoint. ``run_pass``
reads each batch once and runs each model over it once, then hands the layers' outputs to
every ``Consumer``: one decode and one forward pass per model, whatever the number of
consumers.

Memory. What grows with the data goes to disk: each channel's strongest and weakest
activation per image (``Table``, N x C float32 per layer, appended batch by batch and read
back through a memory map), and the decoded inputs themselves (``DecodedCache``, float32, one
table per input size), so that a second pass (dissection's IoU), the projections and the
pages read them instead of decoding the images again. Both live in a
work folder (``work_folder``) removed at the end. Per image only its data-set index and label
stay in memory (16 bytes).

Across processes. Under ``torchrun`` (torch.distributed initialised, more than one rank) rank r
reads the data-set indices i with i % world == r; each consumer merges its ranks' results
exactly in its ``finish`` (a table's rows are put in data-set order, so every number computed
from it is the one a single process computes).

Resuming. With a state folder, the pass saves every consumer's state (and how many rows of
each table and of the cache are valid) every 30 seconds (``PassState``) and on a Ctrl-C that
comes between batches (one that comes while a batch is being fed keeps the last save: a
consumer must not be saved with a batch that another lacks), into one file per rank written
atomically; a later run with the same consumers goes on from there, the rows written after
the save dropped.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vizcnn.checks import feature_maps
from vizcnn.errors import BadArgument, BadImage
from vizcnn.geometry import traced_names
from vizcnn.hooks import forward_to, model_device, preserved_state, strongest_units
from vizcnn.io import atomic_path, save_tensors
from vizcnn.progress import progress_bar
from vizcnn.scan import default_workers, input_batches, open_data

__all__ = [
    "Batch",
    "Consumer",
    "DecodedCache",
    "LayerOutput",
    "PassRecord",
    "Table",
    "barrier",
    "gather",
    "rank_and_world",
    "release_memory",
    "run_pass",
    "work_folder",
]

TABLE_BYTES = 32 * 2**20  # rows of a table read at once


# --------------------------------------------------------------------------- ranks


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` in one process)."""
    import torch.distributed as dist

    world = rank_and_world()[1]
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    return gather(value)[0]


@contextlib.contextmanager
def work_folder(parent: str | os.PathLike | None = None, name: str = "vizcnn",
                keep: str | os.PathLike | None = None) -> Iterator[Path]:
    """A folder for a pass's tables and decoded inputs, the same on every rank: ``keep`` where
    given (a state folder: it stays, to resume), else a new hidden folder in ``parent`` (the
    system's temporary folder by default), named as ``vizcnn.io`` names partial outputs so
    that one left by a killed process is cleaned up by the next write beside it; removed at
    the end."""
    rank = rank_and_world()[0]
    if keep is not None:
        folder = Path(keep)
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        barrier()
        yield folder
        return
    made = None
    if rank == 0:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        made = tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}-", suffix=".partial",
                                dir=parent)
    folder = Path(_from_rank0(made))
    try:
        yield folder
    finally:
        with contextlib.suppress(Exception):
            barrier()  # every rank done with it (an error on one rank may leave the others)
        gc.collect()  # memory maps of its files held by a failed run's frames: let them go
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- tables


@contextlib.contextmanager
def prefetched(items: Iterator, depth: int = 2) -> Iterator[Iterator]:
    """``items`` produced by a thread up to ``depth`` ahead of their use: the next batch is
    decoded while this one runs through the model (both release the GIL for most of their
    work; decoding worker processes, where there are, do this already). An error raised
    while producing is raised where the item would have come; leaving the block stops the
    thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failed(error))

    def consume() -> Iterator:
        while (item := ready.get()) is not end:
            if isinstance(item, _Failed):
                raise item.error
            yield item

    thread = threading.Thread(target=produce, name="vizcnn-prefetch", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def release_memory() -> None:
    """Hand the memory a stage freed back to the system: glibc's ``malloc_trim`` (tensors of
    a few MB, allocated and freed batch after batch, leave free holes in the heap that still
    count as the process's resident memory; 1 ms). Nothing where the C library is not
    glibc. No garbage collection: tensors go when their last reference does, and a
    collection costs 0.1 s or more."""
    trim = getattr(_c_library(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _c_library() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None
    except OSError:
        return None


class Table:
    """Rows (N, C) float32 appended batch by batch to a file and read back through a memory
    map: per-image numbers that would otherwise grow with the data in memory. With
    ``background``, the rows are written by a thread while the next batch is computed (a
    write releases the GIL); ``state``, ``close`` and ``tensor`` wait for it."""

    def __init__(self, path: Path, background: bool = False):
        self.path, self.rows, self.width = Path(path), 0, None
        self._file = None
        self._writer = ThreadPoolExecutor(max_workers=1) if background else None
        self._pending: list[Future] = []

    def append(self, rows: torch.Tensor) -> None:
        """Add (B, C) rows."""
        array = np.ascontiguousarray(rows.detach().float().cpu().numpy())
        self.width = array.shape[1]
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across batches
        self.rows += len(array)
        data = memoryview(array).cast("B")  # the array's bytes, not a copy
        if self._writer is None:
            self._file.write(data)
            return
        self._wait(keep=1)  # at most one batch in flight
        self._pending.append(self._writer.submit(self._file.write, data))

    def _wait(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            self._pending.pop(0).result()  # a failed write (a full disk) is raised here

    def close(self) -> None:
        try:
            self._wait()
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._writer is not None:
                self._writer.shutdown()

    def state(self) -> tuple[int, int | None]:
        self._wait()
        if self._file is not None:
            self._file.flush()
        return self.rows, self.width

    def restore(self, state: tuple[int, int | None]) -> None:
        """Back to ``state`` (rows written after it, by an interrupted run, are dropped)."""
        self.rows, self.width = state
        if self.path.exists():
            os.truncate(self.path, self.rows * (self.width or 0) * 4)

    def tensor(self) -> torch.Tensor:
        """(N, C) the rows, memory-mapped (copy-on-write: the file is never changed)."""
        self.close()
        return read_table(self.path, self.rows, self.width or 0)


def read_table(path: Path, rows: int, width: int) -> torch.Tensor:
    """(rows, width) float32 of a table file, memory-mapped."""
    if rows == 0 or width == 0:
        return torch.zeros(rows, width)
    return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c", shape=(rows, width)))


def merge_tables(paths: Sequence[Path], rows: Sequence[int], width: int,
                 order: torch.Tensor, out: Path) -> None:
    """Write the rows of several tables (``rows[i]`` in ``paths[i]``) into ``out`` in the
    order ``order`` (positions into their concatenation), a bounded chunk at a time."""
    sources = [read_table(p, n, width) for p, n in zip(paths, rows, strict=True)]
    starts = torch.tensor([0, *np.cumsum(rows)[:-1].tolist()])
    owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(list(rows)))
    chunk = max(1, TABLE_BYTES // max(4 * width, 1))
    with open(out, "wb") as file:
        for first in range(0, len(order), chunk):
            wanted = order[first:first + chunk]
            block = torch.empty(len(wanted), width)
            for source, table in enumerate(sources):
                mine = (owner[wanted] == source).nonzero().flatten()
                if len(mine):
                    block[mine] = table[wanted[mine] - starts[source]]
            file.write(block.numpy().tobytes())


def row_chunks(table: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) of a table, ``TABLE_BYTES`` at a time, always cut at the same rows:
    a sum over the chunks is the same whatever wrote the table."""
    chunk = max(1, TABLE_BYTES // max(4 * table.shape[1], 1))
    for first in range(0, table.shape[0], chunk):
        yield first, table[first:first + chunk]


# --------------------------------------------------------------------------- decoded inputs


def cache_files(folder: Path, shape: tuple[int, ...]) -> tuple[Path, Path]:
    """The files of a cache's inputs of one size (C, H, W) and of their masks."""
    name = "x".join(map(str, shape))
    return folder / f"inputs-{name}.f32", folder / f"masks-{name}.f32"


class DecodedCache:
    """The model inputs of a pass, written as they are decoded (per rank, in files of the work
    folder: one table per input size, for data whose images keep their own sizes) and read
    back as a data set indexed as the original: items ``(input, label, mask)``, an unreadable
    image raising ``BadImage`` with the reason it was skipped."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tables: dict[tuple[int, ...], tuple[Table, Table]] = {}  # size: inputs, masks
        self.where: dict[int, tuple[tuple[int, ...], int, int]] = {}  # size, row, mask row
        self.labels: dict[int, Any] = {}
        self.skipped: dict[int, str] = {}

    def _tables(self, shape: tuple[int, ...]) -> tuple[Table, Table]:
        if shape not in self.tables:
            inputs, masks = cache_files(self.folder, shape)
            self.tables[shape] = (Table(inputs, background=True),
                                  Table(masks, background=True))
        return self.tables[shape]

    def add(self, indices: list[int], batch: torch.Tensor, labels: list | None,
            masks: torch.Tensor | None, skipped: list[tuple[int, str]]) -> None:
        """Keep a batch: ``batch`` (B, C, H, W), ``masks`` (B, H, W) or None."""
        self.skipped.update(skipped)
        if not len(indices):
            return
        shape = tuple(batch.shape[1:])
        inputs, mask_table = self._tables(shape)
        row, mask_row = inputs.rows, mask_table.rows if masks is not None else -1
        inputs.append(batch.flatten(1))
        if masks is not None:
            mask_table.append(masks.flatten(1).float())  # concept indices: exact in float32
        for i, index in enumerate(indices):
            self.where[index] = (shape, row + i, mask_row + i if mask_row >= 0 else -1)
        self.labels.update(zip(indices, labels or [None] * len(indices), strict=True))

    def state(self) -> dict:
        return {"tables": {shape: (inputs.state(), masks.state())
                           for shape, (inputs, masks) in self.tables.items()},
                "where": dict(self.where), "labels": dict(self.labels),
                "skipped": dict(self.skipped)}

    def restore(self, state: dict) -> None:
        for shape, (inputs, masks) in state["tables"].items():
            self._tables(shape)[0].restore(inputs)
            self.tables[shape][1].restore(masks)
        self.where, self.labels = dict(state["where"]), dict(state["labels"])
        self.skipped = dict(state["skipped"])

    def close(self) -> None:
        for inputs, masks in self.tables.values():
            inputs.close()
            masks.close()

    def dataset(self, classes: tuple[str, ...] | None) -> Dataset:
        """Every rank's cache as one data set (call on every rank after the pass)."""
        self.close()
        sizes = {shape: (inputs.rows, masks.rows) for shape, (inputs, masks)
                 in self.tables.items()}
        return _CachedInputs(gather((str(self.folder), sizes, self.where, self.labels,
                                     self.skipped)), classes)


class _CachedInputs(Dataset):
    """The ranks' decoded inputs read back (see ``DecodedCache.dataset``)."""

    def __init__(self, parts: list[tuple], classes: tuple[str, ...] | None):
        self.classes = classes
        self.skipped: dict[int, str] = {}
        self.where: dict[int, tuple] = {}  # index: inputs (N, C, H, W), row, masks, mask row
        self.labels: dict[int, Any] = {}
        for folder, sizes, where, labels, skipped in parts:
            arrays = {}
            for shape, (rows, mask_rows) in sizes.items():
                input_file, mask_file = cache_files(Path(folder), shape)
                inputs = read_table(input_file, rows, int(np.prod(shape))).view(rows, *shape)
                masks = read_table(mask_file, mask_rows,
                                   shape[-2] * shape[-1]).view(mask_rows, *shape[-2:])
                arrays[shape] = inputs, masks
            self.where.update({index: (*arrays[shape][:1], row, arrays[shape][1], mask_row)
                               for index, (shape, row, mask_row) in where.items()})
            self.labels.update(labels)
            self.skipped.update(skipped)
        self.length = max([*self.where, *self.skipped], default=-1) + 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple:
        if index in self.skipped:
            raise BadImage(self.skipped[index])
        inputs, row, masks, mask_row = self.where[index]
        return inputs[row], self.labels[index], None if mask_row < 0 else masks[mask_row].long()

    def label(self, index: int) -> Any:
        return self.labels.get(index)


# --------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class LayerOutput:
    """What the consumers take of one layer's output for a batch.

    Attributes:
        values, positions: (B, C) each map's strongest unit and its (y, x) (B, C, 2); for a
            linear layer its features, at (0, 0).
        minima: (B, C) each map's weakest unit.
        maps: (B, C, h, w) the maps themselves, where a consumer asked for them.
    """

    values: torch.Tensor
    positions: torch.Tensor
    minima: torch.Tensor
    maps: torch.Tensor | None = None


@dataclass(frozen=True)
class Batch:
    """One batch of the pass: data-set ``indices``, model ``inputs`` (B, C, H, W) on the
    model's device, ``labels`` (a list, or None without labels), concept ``masks`` (B, H, W)
    long on the CPU (or None) and the images ``skipped`` as (index, reason)."""

    indices: list[int]
    inputs: torch.Tensor
    labels: list | None
    masks: torch.Tensor | None
    skipped: list[tuple[int, str]]


class Consumer(abc.ABC):
    """A user of the pass's batches: which model and layers it needs, and what it does with
    each batch (``add``, which every consumer defines). ``maps``: it needs the whole maps of
    its layers; ``output``: the model's output (the forward pass then runs to the end)."""

    model: nn.Module
    layers: Sequence[str] = ()
    maps: bool = False
    output: bool = False

    @abc.abstractmethod
    def add(self, batch: Batch, found: dict[str, LayerOutput], output: Any) -> None:
        """Take one batch: its layers' outputs ``found`` and the model's ``output``."""

    def state(self) -> Any:
        """What a resumed pass needs to go on (tensors, numbers, lists)."""
        return None

    def restore(self, state: Any) -> None:  # noqa: B027 - optional: stateless by default
        """Go on from ``state`` (a consumer with no ``state`` has nothing to restore)."""


@dataclass
class PassRecord:
    """How a pass went: images read and skipped (``(index, reason)``, in index order), the
    forward passes of each model (by ``id``) and the images decoded."""

    images: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    decoded: int = 0
    count: int = 0


def _layer_output(maps_wanted: bool):
    def on_output(name: str, output: Any) -> LayerOutput:
        output = feature_maps(output, name, flat_ok=True)
        if output.dim() == 2:  # taken before a later in-place op can change it
            values = output.clone()
            return LayerOutput(values, torch.zeros(*values.shape, 2, dtype=torch.long,
                                                   device=values.device), values)
        values, positions = strongest_units(output)
        return LayerOutput(values, positions, output.flatten(2).amin(dim=2),
                           output.clone() if maps_wanted else None)

    return on_output


class _Forward:
    """One model's forward pass per batch, for the consumers that need it."""

    def __init__(self, model: nn.Module, consumers: list[Consumer]):
        self.model = model
        self.layers = list(dict.fromkeys(name for c in consumers for name in c.layers))
        self.maps = any(c.maps for c in consumers)
        self.output = any(c.output for c in consumers)
        self.traced, self.size = None, None

    def __call__(self, batch: torch.Tensor) -> tuple[dict[str, LayerOutput], Any]:
        from vizcnn.hooks import run_forward, scoped_hooks
        from vizcnn.layers import resolve_layer

        batch = batch.to(model_device(self.model), non_blocking=True)
        if not self.output:
            if self.traced is None or batch.shape[-2:] != self.size:
                self.size = batch.shape[-2:]
                self.traced = traced_names(self.model, tuple(self.size), self.layers)
            return forward_to(self.model, batch, self.layers, self.traced,
                              _layer_output(self.maps)), None
        found: dict[str, LayerOutput] = {}
        on_output = _layer_output(self.maps)

        def hook_for(name: str):
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                found[name] = on_output(name, output)  # the last call wins, as in forward_to
            return hook

        hooks = [(resolve_layer(self.model, name), hook_for(name)) for name in self.layers]
        with scoped_hooks(after=hooks):
            output = run_forward(self.model, batch)
        return found, output


class PassState:
    """A pass's saved state (one file per rank in ``folder``), or none (``folder`` None)."""

    def __init__(self, folder: str | os.PathLike | None, key: dict, every: float = 30.0):
        rank, world = rank_and_world()
        self.path = None if folder is None else Path(folder) / (
            f"rank{rank}" if world > 1 else "") / "pass.pt"
        self.key, self.every, self.last = key, every, time.monotonic()
        self.wait = every

    def load(self) -> dict | None:
        """The saved state, checked against this run's key (read once)."""
        if not hasattr(self, "_saved"):
            self._saved = self._read()
        return self._saved

    def _read(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        afresh = f"delete '{self.path.parent}' to start afresh"
        try:
            saved = torch.load(self.path, weights_only=True)  # tensors and plain values
        except Exception:  # noqa: BLE001 - torch.load raises many kinds for bad files
            raise BadArgument(f"the saved state in '{self.path.parent}' cannot be read "
                              "(corrupt, or from another vizcnn version)", afresh) from None
        differences = [f"{what} {saved['key'].get(what)!r}" for what, value in self.key.items()
                       if saved["key"].get(what) != value]
        if differences:
            raise BadArgument(f"the saved state in '{self.path.parent}' is for another run "
                              f"({'; '.join(differences)})", afresh)
        return saved

    def save(self, snapshot: Callable[[], dict], force: bool = False) -> None:
        """Save ``snapshot()`` where it is due: ``every`` seconds at most, and no more often
        than keeps saving under 5 % of the time (a large state, such as dissection's kept
        values at scale, takes a while to write); ``snapshot`` is called only then."""
        if self.path is None or (not force and time.monotonic() - self.last < self.wait):
            return
        started = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as temporary:
            save_tensors({"key": self.key, **snapshot()}, temporary)
        self.last = time.monotonic()
        self.wait = max(self.every, 20 * (self.last - started))


def run_pass(data: Any, consumers: Sequence[Consumer], *, batch_size: int = 64,
             workers: int | None = None, cache: DecodedCache | None = None,
             state: PassState | None = None, known: dict | None = None,
             progress: bool = True, desc: str = "pass") -> PassRecord:
    """Read ``data`` once (this rank's shard) and feed every batch to every consumer: each
    model (the consumers' ``model``) runs once per batch, in eval mode without gradients,
    only as far as its consumers need (to the end where one needs the output).

    Args:
        data: anything ``scan_topk`` takes; decoded for the first consumer's model.
        cache: where the decoded inputs are written as they come, for later passes.
        state: save and resume the pass (see ``PassState``).
        known: ``{index: decoded item}`` already decoded (see ``scan.probe``): not again.

    Returns:
        PassRecord of this rank.
    """
    rank, world = rank_and_world()
    model = consumers[0].model
    models: dict[int, _Forward] = {}
    for consumer in consumers:
        key = id(consumer.model)
        if key not in models:
            models[key] = _Forward(consumer.model, [c for c in consumers
                                                    if c.model is consumer.model])
    record = PassRecord()
    saved = state.load() if state is not None else None
    if saved is not None:
        record = PassRecord(**saved["record"])
        for consumer, part in zip(consumers, saved["consumers"], strict=True):
            consumer.restore(part)
        if cache is not None:
            cache.restore(saved["cache"])

    def snapshot() -> dict:
        return {"record": dataclasses.asdict(record),
                "consumers": [c.state() for c in consumers],
                "cache": cache.state() if cache is not None else None}

    opened = open_data(data)
    total = len(opened) if hasattr(opened, "__len__") else None
    whole = isinstance(opened, Dataset) and hasattr(opened, "__len__")
    states = [preserved_state(m.model, eval_mode=True) for m in models.values()]
    with (progress_bar(total=total, initial=record.count, desc=desc, unit="img",
                       disable=not progress or rank != 0) as bar,
          contextlib.ExitStack() as stack, torch.no_grad()):
        for preserved in states:
            stack.enter_context(preserved)
        between = True  # no batch half fed: a snapshot now is consistent
        batches = input_batches(model, opened, batch_size, record.count, (rank, world),
                                workers, whole=True, known=known)
        processes = default_workers(model, opened) if workers is None else workers
        if not processes:  # decoding processes overlap the forward pass already
            batches = stack.enter_context(prefetched(batches))
        try:
            for parts in batches:
                between = False
                indices, inputs, skipped, labels, masks = parts
                record.decoded += sum(1 for i in [*indices, *(s for s, _ in skipped)]
                                      if i not in (known or {}))
                batch = Batch(indices, inputs, labels if whole else None, masks, skipped)
                if cache is not None:
                    cache.add(indices, inputs, batch.labels, masks, skipped)
                if len(indices):
                    outputs = {key: forward(inputs) for key, forward in models.items()}
                    for consumer in consumers:
                        found, output = outputs[id(consumer.model)]
                        consumer.add(batch, found, output)
                record.images += len(indices)
                record.skipped += skipped
                record.count = max([record.count, *indices, *(s for s, _ in skipped)]) + 1 \
                    if indices or skipped else record.count
                between = True
                bar.update((len(indices) + len(skipped)) * world)
                if state is not None:
                    state.save(snapshot)
        except KeyboardInterrupt:
            # Ctrl-C while a batch was half fed would save some consumers with it and some
            # without: the last save (made between batches) stands then
            if state is not None and between:
                state.save(snapshot, force=True)
            raise
        if state is not None:
            state.save(snapshot, force=True)
    return record


def decoded_source(data: Any, cache: DecodedCache | None) -> Any:
    """The data a later pass reads: the cache of the decoded inputs where there is one."""
    if cache is None:
        return data
    return cache.dataset(getattr(open_data(data), "classes", None))


# --------------------------------------------------------------------------- the top-k scan


class TopKPass(Consumer):
    """A pass's consumer that keeps each channel's top-k images of ``layers`` (what
    ``scan_topk`` computes, with the same ties)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], k: int, source: str,
                 identity: str = ""):
        from vizcnn.scan import _Scan

        self.model, self.layers = model, list(layers)
        self.scan = _Scan(model, self.layers, k, source, identity, None)

    def add(self, batch: Batch, found: dict[str, LayerOutput], output: Any) -> None:
        self.scan.merge(batch.indices, {name: (found[name].values, found[name].positions)
                                        for name in self.layers})
        self.scan.images += len(batch.indices)
        self.scan.skipped += [reason for _, reason in batch.skipped]
        covered = [*batch.indices, *(index for index, _ in batch.skipped)]
        if covered:
            self.scan.count = max(covered) + 1

    def state(self) -> dict:
        return {"kept": {n: tuple(t.cpu() for t in kept) for n, kept in self.scan.kept.items()},
                "count": self.scan.count, "images": self.scan.images,
                "skipped": list(self.scan.skipped)}

    def restore(self, state: dict) -> None:
        device = self.scan.device
        self.scan.kept = {n: tuple(t.to(device) for t in kept)
                          for n, kept in state["kept"].items()}
        self.scan.count, self.scan.images = state["count"], state["images"]
        self.scan.skipped = list(state["skipped"])

    def finish(self) -> Any:
        """The ``TopK``, every rank's lists merged exactly (call on every rank)."""
        from vizcnn.scan import _merge_ranks

        if not self.scan.kept:
            raise BadArgument(f"no image to scan in {self.scan.source}")
        top = self.scan.result()
        return _merge_ranks(top) if rank_and_world()[1] > 1 else top
