"""Streaming top-k: which images of a data set excite each feature map most, and where.

``scan_topk`` runs the model over a data set once, batch by batch, only as far as the deepest
scanned layer, and keeps per layer and channel the k strongest images: each image counts once,
with its strongest unit of the channel (value, data-set index, (y, x) in the map), as in
Zeiler & Fergus's top-9. Memory is O(channels x k) whatever the data set's size.

Ties are broken by the smaller data-set index, and within an image by the first position in
row-major order, so the result does not depend on the batch size or on where a scan was
interrupted and resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vizcnn.checks import positive_int
from vizcnn.data import MASKS_LAYOUT
from vizcnn.data.images import IMAGE_SUFFIXES, UNLABELLED, foreign_mask_value
from vizcnn.display import ShowsItself
from vizcnn.errors import BadArgument, BadImage
from vizcnn.geometry import traced_names
from vizcnn.hooks import (
    finite_images,
    forward_to,
    model_device,
    preserved_state,
    require_hookable,
    strongest_units,
)
from vizcnn.io import atomic_path, save_tensors, writable_parent
from vizcnn.layers import resolve_layer
from vizcnn.models import (
    AssumedPreprocessingWarning,
    InputRecipe,
    Preprocessing,
    input_recipe,
    model_info,
)
from vizcnn.progress import progress_bar

__all__ = [
    "MASKS_LAYOUT",
    "ImageFolder",
    "InMemory",
    "TopK",
    "images_at",
    "in_memory",
    "data_folder",
    "default_workers",
    "discard_state",
    "discarded_on_error",
    "first_input",
    "image_files",
    "input_batches",
    "input_mask",
    "no_readable_image",
    "open_data",
    "probe",
    "read_concepts",
    "scan_topk",
    "sibling_masks",
]

_FORMAT = 1  # version of the saved layout


@dataclass(frozen=True)
class TopK(ShowsItself):
    """The k strongest images per channel of each scanned layer.

    Attributes:
        k: entries kept per channel.
        values: ``{layer: (C, k)}`` strongest activation of the channel in each kept image,
            in descending order; ``-inf`` where fewer than k images were scanned.
        indices: ``{layer: (C, k)}`` long data-set index of each entry (-1 where empty).
        positions: ``{layer: (C, k, 2)}`` long (y, x) of the unit in the layer's map ((0, 0)
            for a linear layer).
        count: the data-set indices covered so far (images read and skipped): a resumed
            scan goes on from data-set index ``count``.
        source: what was scanned (e.g. ``shapes:2000`` or a folder), for the record.
        fingerprint: identifies the model's weights, so a resumed scan cannot mix two models.
        data: identifies the data (``_data_identity``), so a resumed scan cannot mix two data
            sets.
        skipped: images left out, each with the reason (unreadable, NaN or inf values).
        images: images read and ranked (``count`` minus the skipped ones): the number every
            report gives, beside ``len(skipped)``.
    """

    k: int
    values: dict[str, torch.Tensor]
    indices: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor]
    count: int = 0
    source: str = ""
    fingerprint: str = ""
    skipped: tuple[str, ...] = field(default=())
    data: str = ""
    images: int = 0

    @property
    def layers(self) -> list[str]:
        return list(self.values)

    def units(self, layer: str, channel: int) -> list[tuple[float, int, int, int]]:
        """``[(value, index, y, x), ...]`` of one channel, strongest first, empty slots left out."""
        values, indices = self.values[layer][channel], self.indices[layer][channel]
        positions = self.positions[layer][channel]
        return [(float(v), int(i), int(p[0]), int(p[1]))
                for v, i, p in zip(values, indices, positions, strict=True) if i >= 0]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``topk.pt`` (everything) and ``manifest.json`` (the same facts, for people)
        into ``folder``. Each file is replaced atomically, and ``load`` reads ``topk.pt`` only,
        so a save killed at any moment leaves the previous state or the new one, never a mix:
        this is what makes a killed scan resumable. Returns the folder."""
        folder = Path(folder)
        writable_parent(folder / "topk.pt")
        manifest = {"format": _FORMAT, "k": self.k, "count": self.count, "source": self.source,
                    "fingerprint": self.fingerprint, "skipped": list(self.skipped),
                    "data": self.data, "images": self.images,
                    "layers": {layer: list(v.shape) for layer, v in self.values.items()}}
        tensors = {name: {layer: t.cpu() for layer, t in getattr(self, name).items()}
                   for name in ("values", "indices", "positions")}
        with atomic_path(folder / "topk.pt") as temporary:
            save_tensors({"manifest": manifest, **tensors}, temporary)
        with atomic_path(folder / "manifest.json") as temporary:
            temporary.write_text(json.dumps(manifest, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TopK:
        """Read a folder written by ``save``."""
        folder = Path(folder)
        try:
            saved = torch.load(folder / "topk.pt", weights_only=True)
            manifest = saved["manifest"]
        except Exception as error:  # noqa: BLE001 - torch.load raises many kinds for bad files
            raise BadArgument(f"cannot read a saved top-k from '{folder}': "
                              f"{getattr(error, 'strerror', None) or error}",
                              "give a folder written by TopK.save or `vizcnn topk`") from None
        if manifest.get("format") != _FORMAT:
            raise BadArgument(f"'{folder}' holds a top-k of another format version")
        return cls(manifest["k"], saved["values"], saved["indices"], saved["positions"],
                   manifest["count"], manifest["source"], manifest["fingerprint"],
                   tuple(manifest.get("skipped", ())), manifest.get("data", ""),
                   manifest.get("images", manifest["count"] - len(manifest.get("skipped", ()))))


# --------------------------------------------------------------------------- data sources


class ImageFolder(Dataset):
    """The image files under a folder, flat or in class sub-folders (ImageFolder layout),
    sorted by path; ``dataset[i]`` is the uint8 image (3, H, W), read with OpenCV (a view of
    its interleaved pixels).

    Which files count (``image_files``): links to folders are followed, as torchvision's
    ImageFolder does; a link to a missing file counts, and is reported unreadable like a
    corrupt file; hidden files and folders (names starting with ".") are left out.

    With ``masks`` (a folder laid out as the images, see ``MASKS_LAYOUT``) every item is
    ``(image, label, mask)`` instead: ``mask`` (H, W) long holds a concept index per pixel,
    at the image's size, ``label`` is ``label(i)``, and ``concepts`` names the concepts
    (``read_concepts``). A mask that is missing, unreadable, of another size than its image
    or holds a value past the concepts stops the work with one line naming the file.
    """

    def __init__(self, root: str | os.PathLike, masks: str | os.PathLike | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise BadArgument(f"'{root}' is not a folder", "give a folder of images, or "
                              "shapes:N for N demo images")
        self.paths = image_files(self.root)
        if not self.paths:
            raise BadArgument(f"no images in '{root}'",
                              f"expected files ending in {', '.join(IMAGE_SUFFIXES)}")
        relative = [p.relative_to(self.root).parts for p in self.paths]
        self.classes: tuple[str, ...] = tuple(sorted({r[0] for r in relative if len(r) > 1}))
        self.masks = None if masks is None else Path(masks)
        self.concepts: tuple[str, ...] | None = None
        if self.masks is not None:
            if not self.masks.is_dir():
                what = "is not a folder" if self.masks.exists() else "not found"
                raise BadArgument(f"masks folder '{self.masks}' {what}",
                                  "give the folder that holds concepts.txt and the masks")
            self.concepts = read_concepts(self.masks / "concepts.txt")
            missing = [p for p in self.paths
                       if p.exists() and not self.mask_path(p).is_file()]  # not broken links
            if missing:
                raise BadArgument(f"{len(missing)} of {len(self.paths)} images have no mask, "
                                  f"e.g. '{self.mask_path(missing[0])}'",
                                  "give every image a mask (see vizcnn gallery --help)")

    def __len__(self) -> int:
        return len(self.paths)

    def mask_path(self, image: Path) -> Path:
        """Where the mask of ``image`` lies: same relative path under ``masks``, ``.png``."""
        return (self.masks / image.relative_to(self.root)).with_suffix(".png")

    def label(self, index: int) -> int | None:
        """The class of image ``index``: its sub-folder's rank among the sub-folders
        (``classes``, the ImageFolder layout), or None for an image directly in the root."""
        parts = self.paths[index].relative_to(self.root).parts
        return self.classes.index(parts[0]) if len(parts) > 1 else None

    def __getitem__(self, index: int) -> Any:
        from vizcnn.data.images import read_image

        # (3, H, W) uint8 as a view of the decoded (H, W, 3) pixels: no copy, and the
        # preprocessing's resize is faster on interleaved pixels
        image = torch.from_numpy(read_image(self.paths[index])).permute(2, 0, 1)
        if self.masks is None:
            return image
        mask = self.mask(index, tuple(image.shape[-2:]))
        return image, self.label(index), mask

    def mask(self, index: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(H, W) long: the mask of image ``index``, checked against the concepts and, when
        given, its image's (H, W) ``size``."""
        from vizcnn.data.images import read_mask

        path = self.mask_path(self.paths[index])
        mask = read_mask(path)
        if size is not None and tuple(mask.shape) != tuple(size):
            raise BadArgument(f"mask '{path}' is {tuple(mask.shape)}, its image {tuple(size)}",
                              "give each mask its image's size")
        count = len(self.concepts)
        value = foreign_mask_value(mask, count)
        if value is not None:
            named = ", ".join(f"{i} {name}" for i, name in enumerate(self.concepts[:6]))
            raise BadArgument(
                f"mask '{path}' holds value {value}, which names no concept: "
                f"'{self.masks / 'concepts.txt'}' names {count} (values 0-{count - 1}: "
                f"{named}{', ...' if count > 6 else ''}; {UNLABELLED}: unlabelled)",
                "each pixel is the index of its concept: line N of concepts.txt names "
                "value N - 1")
        return mask

    def check_masks(self, progress: bool = False) -> None:
        """Read every mask once and check it (see ``mask``) against its image's size, read
        from the file's header: a bad mask is refused before any long work starts."""
        from vizcnn.data.images import image_size

        with progress_bar(total=len(self.paths), desc="masks", unit="mask",
                          disable=not progress) as bar:
            for index, path in enumerate(self.paths):
                if path.exists():  # a broken link is skipped, masks or not
                    self.mask(index, image_size(path))
                bar.update()


def image_files(root: Path) -> list[Path]:
    """The image files under ``root`` (by suffix), sorted by path. Links to folders are
    followed (a folder reached twice, as through a link to a folder above it, is read once);
    a link to a file counts whether or not its target exists; hidden files and folders are
    left out (such as vizcnn's own temporary outputs, ``.NAME.*.partial``)."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found += [Path(folder, name) for name in files if not name.startswith(".")
                  and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def read_concepts(listing: Path) -> tuple[str, ...]:
    """The concept names of a masks folder's ``concepts.txt``: line N names mask value N - 1.
    UTF-8 (a byte-order mark is dropped); names are stripped of surrounding spaces; blank
    lines at the end are ignored. A blank line before the last name (it would leave a value
    without a name, or shift every name after it), a name given twice, or a file that is not
    UTF-8 text is refused with one line."""
    if listing.is_dir():
        raise BadArgument(f"'{listing}' is a folder, not a file",
                          "concepts.txt names the concepts, one per line")
    if not listing.exists():
        raise BadArgument(f"'{listing}' not found",
                          "a masks folder names its concepts in concepts.txt, one per line")
    try:
        text = listing.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise BadArgument(f"'{listing}' is not UTF-8 text (byte {error.start} is "
                          f"0x{error.object[error.start]:02x})",
                          "save it as UTF-8, one concept name per line") from None
    except OSError as error:
        raise BadArgument(f"cannot read '{listing}': {error.strerror}") from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise BadArgument(f"'{listing}' names no concept", "write one concept name per line")
    lines: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if not name:
            raise BadArgument(f"line {number} of '{listing}' is blank, but line N names mask "
                              f"value N - 1", "write a name on every line up to the last (e.g. "
                              "'unlabelled')")
        if name in lines:
            raise BadArgument(f"'{listing}' names {name!r} twice (lines {lines[name]} and "
                              f"{number})", "give each concept one line")
        lines[name] = number
    return tuple(names)


def sibling_masks(folder: str | os.PathLike) -> Path | None:
    """``FOLDER-masks`` beside an image folder, where it holds a ``concepts.txt`` (of any
    kind: a broken one is then refused by name, never taken for no masks)."""
    folder = Path(folder).resolve()
    candidate = folder.with_name(folder.name + "-masks")
    listing = candidate / "concepts.txt"
    return candidate if listing.exists() or listing.is_symlink() else None


def open_data(data: Any) -> Any:
    """A data argument as something iterable: ``"shapes:N"`` becomes the first N held-out demo
    images, a folder path an ``ImageFolder``; anything else is returned as it is."""
    if isinstance(data, (str, os.PathLike)):
        from vizcnn.data.shapes import HELD_OUT_SEED, ShapesDataset

        text = str(data)
        if text.startswith("shapes:"):
            try:
                count = int(text.removeprefix("shapes:"))
            except ValueError:
                count = -1
            if count < 1:
                raise BadArgument(f"bad data set {text!r}", "write shapes:N, e.g. shapes:2000")
            return ShapesDataset(count, seed=HELD_OUT_SEED)
        return ImageFolder(text)
    return data


def data_folder(data: Any) -> Path | None:
    """The folder of images a data argument reads (a folder path or an ``ImageFolder``), or
    None (``shapes:N``, a data set, a tensor); the folder is not listed."""
    if isinstance(data, ImageFolder):
        return data.root
    if isinstance(data, (str, os.PathLike)) and not str(data).startswith("shapes:"):
        return Path(data)
    return None


def _describe(data: Any) -> str:
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    length = f" of {len(data)}" if hasattr(data, "__len__") else ""
    return f"{type(data).__name__}{length}"


def _data_identity(data: Any) -> str:
    """A short digest of what a scan reads, recorded in its state so that a resumed scan
    cannot mix two data sets: for a folder its absolute path and its sorted file names and
    sizes; for ``shapes:N`` the spec; for a Dataset (or a DataLoader's) its type, length and its
    first and last items; for a tensor its shape and values; for any other iterable its type
    only (it cannot be read twice to check)."""
    digest = hashlib.sha256()
    source = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(source, (str, os.PathLike)) and str(source).startswith("shapes:"):
        digest.update(str(source).encode())
    elif isinstance(source, (str, os.PathLike, ImageFolder)):
        folder = source if isinstance(source, ImageFolder) else ImageFolder(source)
        digest.update(str(folder.root.resolve()).encode())
        for path in folder.paths:
            size = path.stat().st_size if path.exists() else -1  # -1: a broken link
            digest.update(f"{path.relative_to(folder.root)}\0{size}\0".encode())
    elif isinstance(source, torch.Tensor):
        digest.update(f"tensor{tuple(source.shape)}".encode())
        digest.update(_bytes(source))
    elif isinstance(source, Dataset) and hasattr(source, "__len__"):
        length = len(source)
        digest.update(f"{type(source).__qualname__}:{length}".encode())
        for index in sorted({0, 1, 2, length - 1} & set(range(length))):
            _digest_item(digest, source[index])
    else:
        digest.update(type(source).__qualname__.encode())
    return digest.hexdigest()[:16]


def _digest_item(digest: Any, item: Any) -> None:
    """Add the tensors, arrays and numbers of a data-set item to ``digest``."""
    if isinstance(item, (tuple, list)):
        for part in item:
            _digest_item(digest, part)
    elif isinstance(item, torch.Tensor):
        digest.update(_bytes(item))
    elif hasattr(item, "tobytes"):
        digest.update(item.tobytes())
    else:
        digest.update(repr(item).encode())


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


class InMemory(Dataset):
    """A data set read once and kept as model inputs: items ``(input, label, mask)`` (label
    and mask None where the data has none; the mask at the input's size), indexed as the
    original data set; ``classes`` names the labels where the original did."""

    def __init__(self, inputs: torch.Tensor, labels: list[Any], masks: list[Any],
                 classes: tuple[str, ...] | None = None):
        self.inputs, self.labels, self.masks, self.classes = inputs, labels, masks, classes

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        return self.inputs[index], self.labels[index], self.masks[index]


def in_memory(model: nn.Module, data: Any, budget: int = 512 * 2**20,
              workers: int | None = None, known: dict[int, tuple] | None = None) -> Any:
    """``data`` read once into memory as ``InMemory``, when it is an indexable data set whose
    model inputs fit in ``budget`` bytes and whose every item reads cleanly; else ``data``
    itself. Several passes over the same images (a gallery's scan, statistics and
    dissection) then decode and preprocess each image once, in ``workers`` processes (see
    ``default_workers``). ``known``: items decoded already (``probe``), not decoded again."""
    opened = open_data(data)
    if not (isinstance(opened, Dataset) and hasattr(opened, "__len__")) or not len(opened):
        return data
    recipe = input_recipe(model)
    known = dict(known or {})
    if 0 not in known:
        known[0] = _Decoding(opened, recipe, [0], whole=True)[0]
    if isinstance(known[0][1], str):
        return data  # an unreadable image: the passes skip it one by one, as always
    if known[0][1].numel() * 4 * len(opened) > budget:
        return data
    items = list(_decoded(opened, recipe, range(len(opened)), _workers(workers, model, opened),
                          whole=True, known=known))
    if any(isinstance(x, str) for _, x, _, _ in items):
        return data  # the passes skip such an image one by one, as always
    inputs = torch.stack([x for _, x, _, _ in items])
    classes = getattr(opened, "classes", None)
    return InMemory(inputs, [label for _, _, label, _ in items],
                    [mask for _, _, _, mask in items], tuple(classes) if classes else None)


def default_workers(model: nn.Module, data: Any) -> int:
    """Worker processes that decode ``data`` by default: for a folder of image files and a
    model on a GPU, the cores available, so that decoding keeps up with the GPU; otherwise
    none. On the CPU the forward pass and decoding share the same cores, and decoding in the
    main process (whose resize runs on every core) was measured faster than workers: a
    folder of 400 JPEG photos at 313 img/s against 275 with 2 workers, on 2 cores."""
    folder = isinstance(open_data(data), ImageFolder)
    return len(os.sched_getaffinity(0)) if folder and model_device(model).type == "cuda" else 0


def _workers(workers: int | None, model: nn.Module, data: Any) -> int:
    if workers is None:
        return default_workers(model, data)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise BadArgument(f"workers must be a whole number >= 0, got {workers!r}")
    return workers


def _first(item: Any) -> Any:
    """The image of a data-set item: ``(image, label, ...)`` tuples give their first element."""
    return item[0] if isinstance(item, (tuple, list)) else item


def _as_input(recipe: InputRecipe, image: Any) -> torch.Tensor:
    """(C, H, W) model input: float tensors are taken as already preprocessed; uint8 tensors,
    arrays, PIL images and paths go through the model's ``InputRecipe``."""
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if image.dim() != 3:
            raise BadArgument(f"expected images (C, H, W), got a tensor of shape "
                              f"{tuple(image.shape)}")
        return image
    if recipe.assumed:  # once per process: a worker that applies it says so too
        warnings.warn(recipe.assumed, AssumedPreprocessingWarning, stacklevel=2)
    return recipe(image)


def _checked_input(recipe: InputRecipe, index: int, item: Any) -> torch.Tensor | str:
    """The model input of a data-set item, or why it is skipped: unreadable (``item`` may be
    the ``BadImage`` that reading it raised), or NaN / inf values (they would rank first in
    every channel). Checked where it is decoded, so that the main process of a scan with
    workers does only the model's work."""
    try:
        if isinstance(item, BadImage):
            raise item
        image = _as_input(recipe, _first(item))
    except BadImage as error:
        return str(error)
    if not bool(torch.isfinite(image).all()):
        return f"image {index}: NaN or infinite values"
    return image


class _Decoding(Dataset):
    """Item i: ``(index, model input)`` of data-set index ``indices[i]``, or ``(index, why it
    was skipped)`` for an unreadable image; with ``whole``, ``(index, input, label, mask)``
    (the mask at the input's size). What a worker process runs."""

    def __init__(self, data: Dataset, recipe: InputRecipe, indices: Sequence[int],
                 whole: bool = False, known: dict[int, tuple] | None = None):
        self.data, self.recipe, self.indices, self.whole = data, recipe, indices, whole
        self.known = known or {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple:
        index = self.indices[position]
        if index in self.known:  # decoded already (``probe``): not again
            item = self.known[index]
            return item if self.whole else item[:2]
        try:
            item = self.data[index]
        except BadImage as error:  # one unreadable file must not end a long scan
            item = error
        image = _checked_input(self.recipe, index, item)
        if isinstance(image, str):
            return (index, image, None, None) if self.whole else (index, image)
        if not self.whole:
            return index, image
        parts = item if isinstance(item, (tuple, list)) else (item,)
        label = (parts[1] if len(parts) > 1 else
                 self.data.label(index) if hasattr(self.data, "label") else None)
        # a third part is a concept mask where it is a map; the shapes' boxes (4,) are not
        mask = parts[2] if len(parts) > 2 and getattr(parts[2], "ndim", 0) == 2 else None
        if mask is not None:
            mask = _input_mask(self.recipe.preprocessing, _first(item), mask).to(torch.int32)
        return index, image, label, mask


def _decoded(data: Dataset, recipe: InputRecipe, indices: Sequence[int], workers: int, *,
             whole: bool = False, known: dict[int, tuple] | None = None) -> Iterator[tuple]:
    """The items of ``_Decoding`` in the order of ``indices``, read here (``workers`` 0) or in
    worker processes (the same items in the same order)."""
    decoding = _Decoding(data, recipe, indices, whole, known)
    if workers == 0 or len(indices) < 2:
        yield from (decoding[i] for i in range(len(decoding)))
        return
    loader = DataLoader(decoding, batch_size=_CHUNK, num_workers=workers,
                        collate_fn=_shared_chunk, worker_init_fn=_quiet_worker)
    for chunk in loader:
        yield from chunk


_CHUNK = 16  # items a worker decodes and sends at once


def _shared_chunk(items: list[tuple]) -> list[tuple]:
    """A worker's chunk of items, their images stacked into one tensor wherever neighbours
    have the same size: a tensor crosses to the main process through a shared-memory segment
    of its own, and one segment per chunk instead of one per image is what makes workers pay
    off (each item then holds a view of the stack)."""
    out = list(items)
    run: list[int] = []

    def close() -> None:
        if len(run) > 1:
            stacked = torch.stack([out[i][1] for i in run])
            for row, i in enumerate(run):
                out[i] = (out[i][0], stacked[row], *out[i][2:])
        run.clear()

    for i, item in enumerate(items):
        image = item[1]
        if not isinstance(image, torch.Tensor):
            close()
            continue
        if run and out[run[0]][1].shape != image.shape:
            close()
        run.append(i)
    close()
    return out


def _quiet_worker(_: int) -> None:
    """A decoding worker leaves Ctrl-C to the main process, which saves the scan's state.
    (Not ``cv2.setNumThreads`` here: in a forked child it waits for the parent's pool threads,
    which the child does not have, forever.)"""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def input_mask(model: nn.Module, image: Any, mask: Any) -> torch.Tensor:
    """(h, w) long: the concept mask of ``image`` at the model input's size. A mask goes
    through its image's resize (nearest) and crop, as the image does in ``preprocess``; the
    mask of an image that is already a model input (a float tensor) is taken as it is."""
    return _input_mask(model_info(model).preprocessing, image, mask)


def _input_mask(preprocessing: Preprocessing, image: Any, mask: Any) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dim() != 2 or mask.is_floating_point() or mask.is_complex():
        raise BadArgument(f"a mask must be an (H, W) map of integer concept indices, got "
                          f"{tuple(mask.shape)} {mask.dtype}")
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        return mask.long()
    return preprocessing.mask(mask)


def input_batches(model: nn.Module, data: Any, batch_size: int, start: int = 0,
                  shard: tuple[int, int] = (0, 1), workers: int | None = None, *,
                  whole: bool = False, known: dict[int, tuple] | None = None
                  ) -> Iterator[tuple]:
    """Yield ``(indices, batch (B, C, H, W), skipped)`` from data-set index ``start`` on;
    with ``whole``, ``(indices, batch, skipped, labels, masks)``: each image's label (a list,
    None where the data has none) and concept mask at the input's size ((B, H, W) long, or
    None). ``known``: ``{index: item}`` decoded already (see ``probe``).

    A batch holds items of one size (a size change closes the batch). ``skipped`` lists the
    images that were left out as ``(index, reason)`` (unreadable, NaN or inf values): their
    indices are never among a batch's ``indices``. ``shard`` = (rank, world) keeps only the
    indices i with i % world == rank. ``workers``: processes that decode an indexable data
    set (None: see ``default_workers``); the batches are the same with any number. On a GPU
    they come in pinned memory, for non-blocking copies.
    """
    rank, world = shard
    data = open_data(data)
    workers = _workers(workers, model, data)
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise BadArgument(f"a tensor data set must be (N, C, H, W), got {tuple(data.shape)}")
        mine = [i for i in range(start, len(data)) if i % world == rank]
        for first in range(0, len(mine), batch_size):
            chosen = mine[first:first + batch_size]
            yield _without_non_finite(chosen, data[chosen]) + ((None, None) if whole else ())
        return
    recipe = input_recipe(model)
    if isinstance(data, DataLoader):
        index = 0
        for batch in data:
            images = _first(batch)
            chosen = [i for i in range(max(index, start), index + len(images))
                      if i % world == rank]
            if chosen:
                rows = [i - index for i in chosen]
                yield _without_non_finite(chosen, _loader_batch(recipe, images[rows] if isinstance(
                    images, torch.Tensor) else [images[r] for r in rows])) + (
                    (None, None) if whole else ())
            index += len(images)
        return
    pin = workers > 0 and model_device(model).type == "cuda"
    pending: list[torch.Tensor] = []
    indices: list[int] = []
    skipped: list[tuple[int, str]] = []
    labels: list[Any] = []
    masks: list[Any] = []

    def batch() -> tuple:
        stacked = torch.stack(pending) if pending else torch.empty(0)
        stacked = stacked.pin_memory() if pin and pending else stacked
        if not whole:
            return indices, stacked, skipped
        with_labels = bool(labels) and all(label is not None for label in labels)
        with_masks = bool(masks) and all(mask is not None for mask in masks)
        return (indices, stacked, skipped, labels if with_labels else None,
                torch.stack(masks).long() if with_masks else None)

    for index, image, *parts in _inputs(data, recipe, start, shard, workers, whole, known):
        if isinstance(image, str):
            skipped.append((index, image))
            continue
        if pending and image.shape != pending[0].shape:
            yield batch()
            pending, indices, skipped, labels, masks = [], [], [], [], []
        pending.append(image)
        indices.append(index)
        if whole:
            labels.append(_label_of(parts[0]) if parts else None)
            masks.append(parts[1] if parts else None)
        if len(pending) == batch_size:  # now: not after decoding the next image
            yield batch()
            pending, indices, skipped, labels, masks = [], [], [], [], []
    if pending or skipped:
        yield batch()


def _inputs(data: Any, recipe: InputRecipe, start: int, shard: tuple[int, int], workers: int,
            whole: bool = False, known: dict[int, tuple] | None = None) -> Iterator[tuple]:
    """``(index, model input or why it was skipped)`` for each item of this rank's shard
    from ``start`` on, in order (with ``whole``: ``(index, input, label, mask)``): decoded
    by ``_decoded`` where the data can be indexed, else read one by one from the
    iterable."""
    rank, world = shard
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        mine = [i for i in range(start, len(data)) if i % world == rank]
        yield from _decoded(data, recipe, mine, 0 if isinstance(data, InMemory) else workers,
                            whole=whole, known=known)
        return
    for index, item in enumerate(data):
        if index >= start and index % world == rank:
            yield index, _checked_input(recipe, index, item)


def _label_of(label: Any) -> int | None:
    """A data-set item's label as an int (an int or a 0-dim tensor), else None."""
    if isinstance(label, torch.Tensor) and label.dim() == 0 and not label.is_floating_point():
        return int(label)
    return label if isinstance(label, int) and not isinstance(label, bool) else None


def probe(model: nn.Module, data: Any, shard: tuple[int, int] = (0, 1)) -> dict[int, tuple]:
    """The items of this rank's ``shard`` (see ``input_batches``) decoded up to its first
    readable image, as ``{index: (index, input or why it was skipped, label, mask)}``: what
    a pass is told it need not decode again (``known``). Empty for data that cannot be
    indexed (it is read again)."""
    opened = open_data(data)
    if not (isinstance(opened, Dataset) and hasattr(opened, "__len__")) or isinstance(
            opened, InMemory):
        return {}
    rank, world = shard
    mine = range(rank, len(opened), world)
    decoding = _Decoding(opened, input_recipe(model), mine, whole=True)
    known = {}
    for position, index in enumerate(mine):
        known[index] = decoding[position]
        if not isinstance(known[index][1], str):
            break
    return known


def _without_non_finite(indices: list[int], batch: torch.Tensor
                        ) -> tuple[list[int], torch.Tensor, list[tuple[int, str]]]:
    """The batch without its images that hold NaN or inf (they would rank first in every
    channel), and their names for ``skipped``."""
    finite = finite_images(batch)
    if bool(finite.all()):
        return indices, batch, []
    skipped = [(i, f"image {i}: NaN or infinite values")
               for i, ok in zip(indices, finite.tolist(), strict=True) if not ok]
    kept = [i for i, ok in zip(indices, finite.tolist(), strict=True) if ok]
    return kept, batch[finite.to(batch.device)], skipped


def first_input(model: nn.Module, data: Any, known: dict[int, tuple] | None = None
                ) -> torch.Tensor:
    """(1, C, H, W): the model input of the data's first readable image (to check layers,
    channels and sizes on before long work), or a one-line error that says why there is
    none. ``known``: items decoded already (``probe``)."""
    skipped: list[str] = []
    for _, batch, left_out in input_batches(model, data, 1, workers=0, known=known):
        skipped += [reason for _, reason in left_out]
        if len(batch):
            return batch
    raise no_readable_image(skipped)


def no_readable_image(skipped: Sequence[str]) -> BadArgument:
    """The error for data without one readable image, with the first reason."""
    why = f": {len(skipped):,} unreadable, e.g. {skipped[0]}" if skipped else ""
    return BadArgument(f"no readable image in the data{why}",
                       "give a folder of image files, or shapes:N for N demo images")


def _loader_batch(recipe: InputRecipe, images: Any) -> torch.Tensor:
    if isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4:
        return images
    return torch.stack([_as_input(recipe, image) for image in images])


def images_at(model: nn.Module, data: Any, indices: Sequence[int]) -> torch.Tensor:
    """The model inputs (P, C, H, W) of the given data-set indices, in that order (repeats
    allowed): by indexing where the data can be indexed, else by one pass over it."""
    data = open_data(data)
    wanted = {int(i) for i in indices}
    found: dict[int, torch.Tensor] = {}
    if isinstance(data, torch.Tensor):
        found = {index: data[index] for index in wanted if 0 <= index < len(data)}
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        recipe = input_recipe(model)
        found = {index: _as_input(recipe, _first(data[index])) for index in wanted
                 if 0 <= index < len(data)}
    else:  # an iterable: one pass, keeping what is wanted
        for batch_indices, batch, _ in input_batches(model, data, 64):
            for index, image in zip(batch_indices, batch, strict=True):
                if index in wanted:
                    found[index] = image
    missing = sorted(i for i in wanted if i not in found)
    if missing:
        raise BadArgument(f"data-set index {missing[0]} is not in the data",
                          "use the data set the top-k scan ran over")
    return torch.stack([found[int(i)] for i in indices])


# --------------------------------------------------------------------------- the scan


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameter names, shapes and a few values of each."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        if flat.numel():
            digest.update(flat[:: max(flat.numel() // 16, 1)].double().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _empty(k: int, channels: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.full((channels, k), float("-inf"), device=device),
            torch.full((channels, k), -1, dtype=torch.long, device=device),
            torch.zeros(channels, k, 2, dtype=torch.long, device=device))


def _strongest(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel the strongest unit: values (B, C), positions (B, C, 2)."""
    if output.dim() == 2:
        return output, torch.zeros(*output.shape, 2, dtype=torch.long, device=output.device)
    if output.dim() != 4:
        raise BadArgument(f"cannot scan an output of shape {tuple(output.shape)}",
                          "scan conv, pool or linear layers")
    return strongest_units(output)


def _merge(kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor], values: torch.Tensor,
           positions: torch.Tensor, indices: torch.Tensor, k: int):
    """Merge a batch (values (B, C), positions (B, C, 2), ascending data-set indices (B,))
    into the kept (C, k) lists. A stable sort on values keeps the kept entries (smaller
    indices) ahead of the batch's on ties, and the batch in index order."""
    kept_values, kept_indices, kept_positions = kept
    batch, channels = values.shape
    indices = indices.expand(channels, batch)
    all_values = torch.cat([kept_values, values.t().float()], dim=1)
    all_indices = torch.cat([kept_indices, indices], dim=1)
    all_positions = torch.cat([kept_positions, positions.transpose(0, 1)], dim=1)
    order = torch.sort(all_values, dim=1, descending=True, stable=True).indices[:, :k]
    return (all_values.gather(1, order), all_indices.gather(1, order),
            all_positions.gather(1, order[..., None].expand(-1, -1, 2)))


def scan_topk(
    model: nn.Module,
    data: Any,
    layers: str | Sequence[str],
    k: int = 9,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    state_path: str | os.PathLike | None = None,
    save_every: float = 30.0,
    workers: int | None = None,
    progress: bool = True,
) -> TopK:
    """The k strongest images of every channel of each layer over a data set, in one pass.

    Args:
        model: the network; it is left as it was (modes, flags, no hooks).
        data: a folder of images (flat or ImageFolder), ``"shapes:N"``, a torch ``Dataset``
            (items may be ``(image, label, ...)``), a ``DataLoader``, an (N, C, H, W) tensor,
            or any iterable of images. Float tensors are taken as model input; uint8 images,
            arrays and paths are preprocessed for the model.
        layers: one dotted name or several.
        k: entries per channel.
        batch_size: images per forward pass (a DataLoader brings its own batches).
        device: run on this device; the user's model is copied there, never moved. Default:
            the model's device.
        state_path: a folder for the scan's state. It is saved every ``save_every`` seconds
            and on Ctrl-C; a later call with the same path (same model, layers and k) resumes
            from there without rescanning. The finished result is saved there too. A scan
            that fails with an error (not Ctrl-C) removes the state; one that refuses the
            saved state as another scan's leaves it.
        save_every: seconds between state saves.
        workers: processes that decode and resize the images while the model runs (default:
            ``default_workers``: the cores available for a folder on a GPU, else none); the
            result is the same with any number.
        progress: show a tqdm bar.

    Across processes: when ``torch.distributed`` is initialised (e.g. under ``torchrun``) with
    more than one rank, rank r scans the data-set indices i with i % world == r, keeps its own
    state (``state_path/rank<r>``), and the ranks' lists are merged exactly (same values,
    indices and tie-breaking as one process); every rank returns the merged result.

    Returns:
        ``TopK`` with (C, k) values, indices and (C, k, 2) positions per layer.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise BadArgument("no layer to scan", "give at least one layer")
    positive_int(k, "k")
    positive_int(batch_size, "batch_size")
    for name in names:
        resolve_layer(model, name)
    if device is not None and torch.device(device) != model_device(model):
        import copy

        model = copy.deepcopy(model).to(device)
    source = _describe(data)
    identity = _data_identity(data) if state_path is not None else ""
    data = open_data(data)
    workers = _workers(workers, model, data)  # checked before the bar opens
    shard = _shard()
    if state_path is not None and shard[1] > 1:
        state_path = Path(state_path) / f"rank{shard[0]}"
    require_hookable(model)
    scan = _Scan(model, names, k, source, identity, state_path)  # refuses another scan's state
    with (progress_bar(total=_length(data), initial=scan.count, desc="scan", unit="img",
                       disable=not progress or shard[0] != 0) as bar,
          discarded_on_error(state_path)):
        try:
            with preserved_state(model, eval_mode=True), torch.no_grad():
                for indices, batch, batch_skipped in input_batches(model, data, batch_size,
                                                                   scan.count, shard, workers):
                    scan.add(indices, batch, batch_skipped)
                    bar.update((len(batch) + len(batch_skipped)) * shard[1])
                    scan.save(every=save_every)
        except KeyboardInterrupt:
            scan.save()
            raise
        if not scan.kept:
            raise BadArgument(f"no image to scan in {source}" + (
                f" for rank {shard[0]} of {shard[1]}" if shard[1] > 1 else ""))
        top = scan.result()
        if state_path:
            top.save(state_path)
    return _merge_ranks(top) if shard[1] > 1 else top


@contextlib.contextmanager
def discarded_on_error(state_path: str | os.PathLike | None) -> Iterator[None]:
    """A block after which a scan's state is kept only if it was interrupted: an error (not
    Ctrl-C, nor a kill) removes it (``discard_state``)."""
    try:
        yield
    except Exception:
        discard_state(state_path)
        raise


def discard_state(state_path: str | os.PathLike | None) -> None:
    """Remove a scan's saved state (and its folder, where a rank's state was the last in it).
    A state exists to resume an *interrupted* run (Ctrl-C, a kill): a run that fails with an
    error removes it, so that it leaves nothing behind."""
    if state_path is None:
        return
    state = Path(state_path)
    shutil.rmtree(state, ignore_errors=True)
    if state.name.startswith("rank"):
        with contextlib.suppress(OSError):
            state.parent.rmdir()  # only if empty: the other ranks' states stay


class _Scan:
    """A scan in progress: the top-k lists so far (on the model's device), how many data-set
    indices they cover, and the skipped images; resumed from ``state_path`` where a saved
    state is there, and saved back to it."""

    def __init__(self, model: nn.Module, names: list[str], k: int, source: str, identity: str,
                 state_path: str | os.PathLike | None):
        self.model, self.names, self.k = model, names, k
        self.source, self.identity, self.state_path = source, identity, state_path
        self.device = model_device(model)
        self.fingerprint = model_fingerprint(model)
        state = (_resume(state_path, names, k, self.fingerprint, identity)
                 if state_path else None)
        self.kept = ({n: (state.values[n].to(self.device), state.indices[n].to(self.device),
                          state.positions[n].to(self.device)) for n in names} if state else {})
        self.count = state.count if state else 0
        self.images = state.images if state else 0
        self.skipped = list(state.skipped) if state else []
        self.traced: list[str] | None = None
        self.input_size: torch.Size | None = None
        self.last_save = time.monotonic()

    def add(self, indices: list[int], batch: torch.Tensor, skipped: list[tuple[int, str]]
            ) -> None:
        """Merge one batch (B, C, H, W) of data-set ``indices`` into the lists, and count the
        ``(index, reason)`` of the images skipped on the way."""
        if len(batch):
            self._rank(indices, batch)
        self.images += len(indices)
        self.skipped += [reason for _, reason in skipped]
        covered = [*indices, *(index for index, _ in skipped)]
        if covered:  # only once merged: a saved state is never ahead
            self.count = max(covered) + 1

    def _rank(self, indices: list[int], batch: torch.Tensor) -> None:
        batch = batch.to(self.device, non_blocking=True)
        if self.traced is None or batch.shape[-2:] != self.input_size:
            self.input_size = batch.shape[-2:]
            self.traced = traced_names(self.model, tuple(self.input_size), self.names)
        self.merge(indices, forward_to(self.model, batch, self.names, self.traced,
                                       lambda _, out: _strongest(out)))

    def merge(self, indices: list[int], found: dict[str, tuple[torch.Tensor, torch.Tensor]]
              ) -> None:
        """Merge one batch's strongest units, ``{layer: (values (B, C), positions (B, C,
        2))}`` of the data-set ``indices``, into the lists."""
        order = torch.tensor(indices, device=self.device)
        for name in self.names:
            values, positions = found[name]
            values, positions = values.to(self.device), positions.to(self.device)
            if name not in self.kept:
                self.kept[name] = _empty(self.k, values.shape[1], self.device)
            self.kept[name] = _merge(self.kept[name], values, positions, order, self.k)

    def save(self, every: float | None = None) -> None:
        """Save the state (when there is a state path and something to save); with ``every``,
        only if that many seconds have passed since the last save."""
        if not self.state_path or not self.kept:
            return
        if every is not None and time.monotonic() - self.last_save < every:
            return
        self.result().save(self.state_path)
        self.last_save = time.monotonic()

    def result(self) -> TopK:
        kept = self.kept
        return TopK(self.k, {n: kept[n][0].cpu() for n in kept},
                    {n: kept[n][1].cpu() for n in kept}, {n: kept[n][2].cpu() for n in kept},
                    self.count, self.source, self.fingerprint, tuple(self.skipped),
                    self.identity, self.images)


def _length(data: Any) -> int | None:
    """How many images ``data`` holds, when it says (for the progress bar)."""
    source = data.dataset if isinstance(data, DataLoader) else data
    return len(source) if hasattr(source, "__len__") else None


def _shard() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _merge_ranks(top: TopK) -> TopK:
    """Every rank's top-k lists merged into one, exactly as a single process keeps them:
    by value descending, ties to the smaller data-set index."""
    import torch.distributed as dist

    gathered: list[TopK | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, top)
    values, indices, positions = {}, {}, {}
    for layer in top.layers:
        all_values = torch.cat([t.values[layer] for t in gathered], dim=1)
        all_indices = torch.cat([t.indices[layer] for t in gathered], dim=1)
        all_positions = torch.cat([t.positions[layer] for t in gathered], dim=1)
        empty = all_indices < 0  # empty slots sort after every image
        by_index = torch.argsort(torch.where(empty, torch.iinfo(torch.long).max, all_indices),
                                 dim=1, stable=True)
        all_values, all_indices = all_values.gather(1, by_index), all_indices.gather(1, by_index)
        all_positions = all_positions.gather(1, by_index[..., None].expand(-1, -1, 2))
        order = torch.sort(all_values, dim=1, descending=True, stable=True).indices[:, :top.k]
        values[layer] = all_values.gather(1, order)
        indices[layer] = all_indices.gather(1, order)
        positions[layer] = all_positions.gather(1, order[..., None].expand(-1, -1, 2))
    skipped = tuple(name for t in gathered for name in t.skipped)
    return TopK(top.k, values, indices, positions, max(t.count for t in gathered), top.source,
                top.fingerprint, skipped, top.data, sum(t.images for t in gathered))


def _resume(state_path, names: list[str], k: int, fingerprint: str, data: str
            ) -> TopK | None:
    """The saved state at ``state_path`` if there is one, checked against this scan."""
    if not (Path(state_path) / "topk.pt").exists():
        return None
    afresh = f"delete '{state_path}' to start the scan afresh"
    try:
        state = TopK.load(state_path)
    except BadArgument:
        raise BadArgument(f"the scan state in '{state_path}' cannot be read (corrupt, or from "
                          "another vizcnn version)", afresh) from None
    differences = [what for what, same in (
        (f"layers {', '.join(state.layers)}", state.layers == names),
        (f"k={state.k}", state.k == k),
        ("another model", state.fingerprint == fingerprint),
        (f"other data ({state.source})", state.data == data)) if not same]
    if differences:
        raise BadArgument(f"the scan state in '{state_path}' is for another scan "
                          f"({'; '.join(differences)})", afresh)
    return state
