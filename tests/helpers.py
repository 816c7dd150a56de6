"""Shared by several test modules: assertions (no hook left behind, the model unchanged) and
small networks. pytest puts tests/ on sys.path (``pythonpath`` in pyproject.toml), so test
modules and ``--arch helpers:...`` import this as ``helpers``."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch
from torch import nn


def hooks_left(model: nn.Module) -> list[str]:
    """Names of modules that hold any forward, pre-forward or backward hook."""
    held = []
    for name, module in model.named_modules():
        for attribute in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                          "_backward_pre_hooks", "_forward_hooks_with_kwargs"):
            if getattr(module, attribute, None):
                held.append(f"{name or '<root>'}.{attribute}")
    return held


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert hooks_left(model) == []
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key  # bit-identical
    for key in ("training", "inplace", "requires_grad"):
        assert after[key] == before[key], key


def distributed_scan_worker(rank: int, world: int, store: str, out: str, data: str,
                            layers: list[str]) -> None:
    """One rank of a torch.distributed scan (gloo, file store); rank 0 saves the result."""
    import torch.distributed as dist

    import vizcnn

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        top = vizcnn.scan_topk(vizcnn.load_model("demo"), data, layers, batch_size=16,
                               progress=False)
        if rank == 0:
            top.save(out)
        dist.barrier()  # both ranks done before either tears gloo down: a rank that left
        # while its peer still wrote was seen to abort ("terminate called without an active
        # exception") in one CI run under load
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- tiny hand-worked nets


class TinyChain(nn.Module):
    """conv 3x3 p1 -> relu -> maxpool 3/2 -> conv 5x5 s2 p0 -> relu: fields worked by hand."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2), nn.Conv2d(4, 6, 5, stride=2), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))


class TinyResidual(nn.Module):
    """stem conv 3x3 -> [conv 3x3, conv 3x3] + 1x1 skip, all stride 1: a residual graph whose
    field is worked by hand (3, then 3 + 2 + 2 = 7 through the main branch)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.stem(x))
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += self.skip(x)  # in place: a chain test must not be fooled by it
        return self.relu(out)


# --------------------------------------------------------------------------- networks unlike ours
# Factories by dotted name, for `--arch helpers:...` (the tests folder is on sys.path).

CALLED: list[str] = []  # what a checkpoint's "arch" field made run, if anything


def record_call(**kwargs) -> nn.Module:
    """An architecture factory that notes it was called (code named in a checkpoint)."""
    CALLED.append("record_call")
    return one_channel_net()


def one_channel_net(**kwargs) -> nn.Module:
    """A grayscale classifier: 1 input channel, 5 classes, for 32 x 32 inputs or larger."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.PReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3), nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, 5))


class TupleNet(nn.Module):
    """A two-headed network: (class scores (N, 6), box (N, 4)); GELU as a function, PReLU,
    a ceil-mode pool and a fixed-size head for 32 x 32 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.PReLU(8)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.classes = nn.Linear(8 * 16 * 16, 6)
        self.box = nn.Linear(8 * 16 * 16, 4)

    def forward(self, x):
        x = self.pool(self.act(self.conv1(x)))
        x = torch.nn.functional.gelu(self.conv2(x)).flatten(1)
        return self.classes(x) * 20, self.box(x)


def tuple_net(**kwargs) -> nn.Module:
    torch.manual_seed(4)
    return TupleNet().eval()


class _Pair(nn.Module):
    """A layer whose output is a tuple: no channels to visualize."""

    def forward(self, x):
        return x, x


def pair_net(**kwargs) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 4, 3), _Pair())


# --------------------------------------------------------------------------- the gallery


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("href", "src") and value is not None:
                self.targets.append(value)


def check_links(site: Path) -> int:
    """Every href and src of every page resolves to a file of the site; no URL leaves it.
    Returns the number of pages."""
    pages = sorted(site.rglob("*.html"))
    for page in pages:
        parser = _Links()
        text = page.read_text()
        parser.feed(text)
        assert not re.search(r"(https?:)?//", text), page  # no CDN, no web fonts
        for target in parser.targets:
            assert not target.startswith(("/", "http", "data:")), (page, target)
            resolved = (page.parent / target.split("#")[0]).resolve()
            assert resolved.is_file(), (page, target)
            assert site.resolve() in resolved.parents, (page, target)
    return len(pages)


def shapes_folder(root: Path, count: int, size: int = 64, seed: int = 7) -> Path:
    """``count`` shapes as PNG files in one sub-folder per class (named as the shapes, so
    sorted folder order is not the demo's class order), their concept masks in the sibling
    ``<root>-masks`` laid out as ``vizcnn.scan.MASKS_LAYOUT``. Returns the images' folder."""
    import cv2

    from vizcnn.data.shapes import SHAPE_CLASSES, SHAPE_CONCEPTS, ShapesDataset

    data = ShapesDataset(count, seed=seed, image_size=size, masks=True)
    masks = root.with_name(root.name + "-masks")
    masks.mkdir(parents=True)
    (masks / "concepts.txt").write_text("\n".join(SHAPE_CONCEPTS) + "\n")
    for index in range(count):
        image, label, mask = data[index]
        name = f"{SHAPE_CLASSES[label]}/{index:04d}.png"
        for folder in (root, masks):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), cv2.cvtColor(image.permute(1, 2, 0).numpy(),
                                                   cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(masks / name), mask.numpy().astype(np.uint8))
    return root


def resumed_gallery_worker(rank: int, world: int, store: str, count: int, out: str,
                           state: str, options: dict, stop_at: int) -> None:
    """One rank of a gloo gallery over ``shapes:count`` that is interrupted (Ctrl-C, as
    ``KeyboardInterrupt``) while decoding data-set index ``stop_at`` or the first of its
    shard past it, then run again: the second run must resume from the rank's own saved
    state, feeding none of the first run's images again."""
    import torch.distributed as dist

    import vizcnn
    import vizcnn.datapass as datapass
    from vizcnn.data.shapes import ShapesDataset
    from vizcnn.render.gallery import write_gallery

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    real_add, real_item = datapass.TopKPass.add, ShapesDataset.__getitem__
    fed: list[int] = []
    interrupt = [True]

    def counted(self, batch, *args):
        fed.extend(batch.indices)
        return real_add(self, batch, *args)

    def item(self, index):
        if interrupt[0] and index >= stop_at:
            raise KeyboardInterrupt
        return real_item(self, index)

    try:
        model = vizcnn.load_model("demo")
        datapass.TopKPass.add, ShapesDataset.__getitem__ = counted, item
        try:
            write_gallery(model, f"shapes:{count}", out, state_path=state, **options)
            raise AssertionError("the first run was not interrupted")
        except KeyboardInterrupt:
            pass
        assert (Path(state) / f"rank{rank}" / "pass.pt").exists()
        first, interrupt[0] = len(fed), False
        assert first > 0
        write_gallery(model, f"shapes:{count}", out, state_path=state, **options)
        assert sorted(fed) == list(range(rank, count, world)), (rank, first, fed)  # once each
        dist.barrier()
    finally:
        datapass.TopKPass.add, ShapesDataset.__getitem__ = real_add, real_item
        dist.destroy_process_group()
