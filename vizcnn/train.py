"""Train the demo network (ZFNetMini) on the shapes data set, reproducibly, on the CPU.

Every epoch draws fresh images (indices ``epoch * per_epoch ...`` of the training seed), so the
network never sees an image twice and never sees the held-out seed. Checkpoints are written at
the chosen epochs (``epoch_00.pt`` is the initialisation) for feature-evolution figures, each
file atomically, so an interrupted run leaves only complete checkpoints behind.

    vizcnn train-demo --out runs/demo            # or: python scripts/train_demo.py --out ...
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vizcnn.data.shapes import HELD_OUT_SEED, SHAPE_CLASSES, TRAIN_SEED, ShapesDataset
from vizcnn.errors import BadArgument
from vizcnn.hooks import model_device, preserved_state
from vizcnn.io import atomic_path, save_tensors, writable_parent
from vizcnn.models import DEMO_PREPROCESSING, demo_initialisation, model_info
from vizcnn.progress import progress_bar

__all__ = [
    "TrainResult",
    "accuracy",
    "predict",
    "render_batch",
    "ship_demo_checkpoints",
    "train_demo",
]


@dataclass(frozen=True)
class TrainResult:
    """What ``train_demo`` did: the checkpoint per saved epoch and the held-out accuracy."""

    checkpoints: dict[int, Path]
    held_out_accuracy: float
    seconds: float
    losses: list[float] = field(default_factory=list)


def render_batch(seed: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``start .. start + count`` of a shapes seed, normalised: ((N, 3, 64, 64), (N,))."""
    dataset = ShapesDataset(start + count, seed=seed, transform=DEMO_PREPROCESSING)
    images, labels = [], []
    for index in range(start, start + count):
        image, label, _ = dataset[index]
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Top-1 labels (N,) on the CPU for images (N, 3, H, W); the model's modes are restored."""
    device = model_device(model)
    with preserved_state(model, eval_mode=True):
        return torch.cat([model(images[start:start + batch_size].to(device)).argmax(1).cpu()
                          for start in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct top-1 predictions."""
    return (predict(model, images) == labels).float().mean().item()


def _save(model: nn.Module, path: Path, epoch: int, seed: int, **extra) -> Path:
    checkpoint = {"arch": model_info(model).spec, "state_dict": model.state_dict(),
                  "epoch": epoch, "seed": seed, "classes": list(SHAPE_CLASSES), **extra}
    with atomic_path(path) as temporary:
        save_tensors(checkpoint, temporary)
    return path


def train_demo(
    out_dir: str | Path = "runs/demo",
    *,
    epochs: int = 20,
    per_epoch: int = 12_000,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    save_epochs: Sequence[int] = (0, 1, 2, 5, 10),
    held_out: int = 2000,
    seed: int = TRAIN_SEED,
    arch: str = "demo",
    progress: bool = True,
) -> TrainResult:
    """Train ZFNetMini from ``demo_initialisation(seed)`` and save checkpoints.

    Args:
        out_dir: folder for ``epoch_NN.pt`` and ``final.pt``.
        epochs: passes, each over ``per_epoch`` fresh images.
        save_epochs: epochs to keep a checkpoint of besides the final one (0 = initialisation).
        held_out: images of ``HELD_OUT_SEED`` to measure the final accuracy on.
        arch: "demo" (ZFNetMini) or "demo_alexnet" (the same with AlexNet's 11x11 stride-4
            first layer), trained with the same recipe and seed.

    Returns:
        TrainResult, with the held-out accuracy also stored in ``final.pt``.
    """
    if epochs < 1:
        raise BadArgument(f"epochs must be at least 1, got {epochs} (CLI: --epochs)")
    if per_epoch < batch_size:
        raise BadArgument(f"{per_epoch} images per epoch is less than one batch of {batch_size}",
                          f"give at least {batch_size} (CLI: --per-epoch {batch_size})")
    out_dir = Path(out_dir)
    writable_parent(out_dir / "final.pt")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = demo_initialisation(seed, arch)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    batches = epochs * (per_epoch // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, learning_rate, total_steps=batches,
                                                   pct_start=0.15)
    checkpoints: dict[int, Path] = {}
    if 0 in save_epochs:
        checkpoints[0] = _save(model, out_dir / "epoch_00.pt", 0, seed)
    losses: list[float] = []
    generator = torch.Generator().manual_seed(seed)
    with progress_bar(total=batches, desc=f"training {arch}", unit="batch",
                      disable=not progress) as bar:
        try:
            for epoch in range(1, epochs + 1):
                images, labels = render_batch(seed, (epoch - 1) * per_epoch, per_epoch)
                order = torch.randperm(per_epoch, generator=generator)
                model.train()
                for step in range(per_epoch // batch_size):
                    batch = order[step * batch_size:(step + 1) * batch_size]
                    loss = F.cross_entropy(model(images[batch]), labels[batch])
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    schedule.step()
                    losses.append(loss.item())
                    bar.update()
                    recent = losses[-50:]
                    bar.set_postfix(epoch=epoch, loss=f"{sum(recent) / len(recent):.3f}")
                model.eval()
                if epoch in save_epochs and epoch != epochs:
                    checkpoints[epoch] = _save(model, out_dir / f"epoch_{epoch:02d}.pt", epoch,
                                               seed)
        finally:
            model.eval()
    test_images, test_labels = render_batch(HELD_OUT_SEED, 0, held_out)
    held_out_accuracy = accuracy(model, test_images, test_labels)
    checkpoints[epochs] = _save(model, out_dir / "final.pt", epochs, seed,
                                held_out_accuracy=held_out_accuracy, held_out_images=held_out)
    return TrainResult(checkpoints, held_out_accuracy, time.perf_counter() - started, losses)


def ship_demo_checkpoints(run_dir: str | Path) -> list[Path]:
    """Copy a ``train_demo`` run into the package: ``final.pt`` as the demo checkpoint, and
    its earlier epochs (``epoch_NN.pt`` of ``DEMO_EPOCHS`` but 0, which ``demo:0`` rebuilds
    from the seed) in float16, one file each, for ``demo:N`` and Fig. 4."""
    import shutil

    from vizcnn.models import DEMO_EPOCHS, demo_epoch_checkpoint

    run_dir = Path(run_dir)
    final = torch.load(run_dir / "final.pt", map_location="cpu", weights_only=True)
    if final["epoch"] != DEMO_EPOCHS[-1]:
        raise BadArgument(f"{run_dir / 'final.pt'} is of epoch {final['epoch']}, the demo "
                          f"ships epoch {DEMO_EPOCHS[-1]}")
    for epoch in DEMO_EPOCHS[1:-1]:
        saved = torch.load(run_dir / f"epoch_{epoch:02d}.pt", map_location="cpu",
                           weights_only=True)
        saved["state_dict"] = {name: value.half() for name, value in saved["state_dict"].items()}
        with atomic_path(demo_epoch_checkpoint(epoch)) as temporary:
            save_tensors(saved, temporary)
    with atomic_path(demo_epoch_checkpoint(DEMO_EPOCHS[-1])) as temporary:
        shutil.copyfile(run_dir / "final.pt", temporary)
    return [demo_epoch_checkpoint(epoch) for epoch in DEMO_EPOCHS[1:]]
