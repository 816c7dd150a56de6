"""scan_topk: equals brute force, resumes exactly, reads every kind of data, leaves no hook."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from helpers import assert_unchanged, hooks_left, snapshot
from torch.utils.data import DataLoader, Dataset

import vizcnn
from vizcnn.data.shapes import HELD_OUT_SEED, ShapesDataset
from vizcnn.scan import TopK, images_at, scan_topk

LAYERS = ["features.3", "features.10"]


@pytest.fixture(scope="module")
def shapes200():
    return ShapesDataset(200, seed=HELD_OUT_SEED)


def brute_force(model, dataset, layer: str, k: int):
    """All activations of all images, then per channel: each image's strongest unit (first in
    row-major order on ties), images sorted by value descending, then by index."""
    batch = torch.cat([vizcnn.preprocess(model, dataset[i][0]) for i in range(len(dataset))])
    maps = torch.cat([vizcnn.activations(model, batch[i:i + 64], [layer])[layer]
                      for i in range(0, len(batch), 64)]).numpy()  # (N, C, h, w)
    count, channels, height, width = maps.shape
    flat = maps.reshape(count, channels, -1)
    best = flat.argmax(axis=2)  # numpy: first occurrence
    values = flat.max(axis=2)
    result = {"values": [], "indices": [], "positions": []}
    for channel in range(channels):
        order = np.lexsort((np.arange(count), -values[:, channel]))[:k]
        result["values"].append(values[order, channel])
        result["indices"].append(order)
        result["positions"].append(np.stack([best[order, channel] // width,
                                             best[order, channel] % width], axis=1))
    return {key: np.stack(value) for key, value in result.items()}


def assert_same(a: TopK, b: TopK) -> None:
    assert a.layers == b.layers and a.k == b.k and a.count == b.count
    for layer in a.layers:
        assert torch.equal(a.values[layer], b.values[layer])
        assert torch.equal(a.indices[layer], b.indices[layer])
        assert torch.equal(a.positions[layer], b.positions[layer])


def test_equals_brute_force(demo, shapes200):
    before = snapshot(demo)
    top = scan_topk(demo, shapes200, LAYERS, k=9, batch_size=64, progress=False)
    assert_unchanged(demo, before)
    assert top.count == 200
    for layer in LAYERS:
        expected = brute_force(demo, shapes200, layer, 9)
        assert np.array_equal(top.values[layer].numpy(), expected["values"])
        assert np.array_equal(top.indices[layer].numpy(), expected["indices"])
        assert np.array_equal(top.positions[layer].numpy(), expected["positions"])
    # the batch size changes nothing, nor does the kind of data source
    assert_same(top, scan_topk(demo, shapes200, LAYERS, batch_size=17, progress=False))
    assert_same(top, scan_topk(demo, "shapes:200", LAYERS, progress=False))
    inputs = torch.cat([vizcnn.preprocess(demo, shapes200[i][0]) for i in range(200)])
    loader = DataLoader(torch.utils.data.TensorDataset(inputs, torch.zeros(200)), batch_size=50)
    assert_same(top, scan_topk(demo, loader, LAYERS, progress=False))
    assert_same(top, scan_topk(demo, inputs, LAYERS, progress=False))
    assert_same(top, scan_topk(demo, (shapes200[i][0] for i in range(200)), LAYERS,
                               progress=False))


def test_fewer_images_than_k_leave_empty_slots(demo):
    top = scan_topk(demo, "shapes:5", ["features.10"], k=9, progress=False)
    assert (top.indices["features.10"][:, 5:] == -1).all()
    assert torch.isinf(top.values["features.10"][:, 5:]).all()
    assert sorted(top.indices["features.10"][0, :5].tolist()) == [0, 1, 2, 3, 4]
    assert len(top.units("features.10", 0)) == 5


class Interrupting:
    """The shapes images, with Ctrl-C (or another error) after ``stop_after`` items; counts
    the items it hands out."""

    def __init__(self, dataset, stop_after: int | None, error=KeyboardInterrupt):
        self.dataset, self.stop_after, self.error = dataset, stop_after, error
        self.served = 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if self.stop_after is not None and self.served >= self.stop_after:
            raise self.error()
        self.served += 1
        return self.dataset[index]


class Killed(BaseException):
    """Stands for a SIGKILL in the middle of a scan: no handler of the scan's runs for it (it
    is neither an error nor Ctrl-C), so the state on disk is the last periodic save."""


@pytest.mark.parametrize(("error", "save_every"), [(KeyboardInterrupt, 3600.0),
                                                    (Killed, 0.0)])
def test_resumed_scan_equals_an_uninterrupted_one(demo, shapes200, tmp_path, error,
                                                  save_every):
    """Ctrl-C saves the state at once; a kill loses at most what came after the last periodic
    save (here: after every batch). The resumed scan rescans nothing it saved."""
    class Items(Interrupting, Dataset):
        pass

    whole = scan_topk(demo, shapes200, LAYERS, batch_size=32, progress=False)
    state = tmp_path / "state"
    identity_reads = 4  # a scan with a state reads items 0, 1, 2 and the last to know its data
    first = Items(shapes200, stop_after=100 + identity_reads, error=error)
    with pytest.raises(error):
        scan_topk(demo, first, LAYERS, batch_size=32, state_path=state, save_every=save_every,
                  progress=False)
    assert hooks_left(demo) == []
    saved = TopK.load(state)
    assert saved.count == 96  # three whole batches of 32 before the 101st item failed
    second = Items(shapes200, stop_after=None)
    resumed = scan_topk(demo, second, LAYERS, batch_size=32, state_path=state, progress=False)
    assert second.served == 200 - saved.count + identity_reads
    assert_same(resumed, whole)
    # a finished state is a finished scan
    third = Items(shapes200, stop_after=None)
    assert_same(scan_topk(demo, third, LAYERS, batch_size=32, state_path=state,
                          progress=False), whole)
    assert third.served == identity_reads  # and nothing scanned


def test_a_scan_that_fails_with_an_error_leaves_no_state(demo, shapes200, tmp_path):
    """A state is for resuming an interrupted scan: an error (here the data set's own) removes
    it, also one resumed from an earlier interruption; refusing another scan's state keeps
    it."""
    class Items(Interrupting, Dataset):
        pass

    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        scan_topk(demo, Items(shapes200, stop_after=40), LAYERS, batch_size=16,
                  state_path=state, progress=False)
    assert (state / "topk.pt").is_file()
    with pytest.raises(vizcnn.BadArgument, match="another scan"):
        scan_topk(demo, Items(shapes200, stop_after=None), LAYERS, k=3, batch_size=16,
                  state_path=state, progress=False)
    assert (state / "topk.pt").is_file()
    with pytest.raises(RuntimeError):
        scan_topk(demo, Items(shapes200, stop_after=120, error=RuntimeError), LAYERS,
                  batch_size=16, state_path=state, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_state_of_another_scan_is_refused(demo, tmp_path):
    state = tmp_path / "state"
    scan_topk(demo, "shapes:20", LAYERS, k=4, state_path=state, progress=False)
    with pytest.raises(vizcnn.BadArgument, match="another scan"):
        scan_topk(demo, "shapes:20", LAYERS, k=5, state_path=state, progress=False)
    with pytest.raises(vizcnn.BadArgument, match="another scan"):
        scan_topk(demo, "shapes:20", ["features.3"], k=4, state_path=state, progress=False)


def test_save_and_load(demo, tmp_path):
    top = scan_topk(demo, "shapes:30", LAYERS, k=3, progress=False)
    folder = top.save(tmp_path / "top")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "topk.pt"]
    assert_same(TopK.load(folder), top)
    with pytest.raises(vizcnn.BadArgument, match="cannot read a saved top-k"):
        TopK.load(tmp_path / "nothing")


def test_image_folder_with_a_corrupt_file(demo, tmp_path, shapes200):
    root = tmp_path / "images"
    for index in range(12):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        image = shapes200.render(index).image
        cv2.imwrite(str(folder / f"{index:02d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (root / "a" / "broken.png").write_bytes(b"not a png")
    top = scan_topk(demo, str(root), ["features.10"], k=4, progress=False)
    assert len(top.skipped) == 1 and "broken.png" in top.skipped[0]
    assert top.count == 13
    # the folder order is sorted by path: a/01, a/03, ..., a/11, a/broken, b/00, b/02, ...
    x = images_at(demo, str(root), [0, 8])
    assert torch.equal(x[0], vizcnn.preprocess(demo, shapes200.render(1).image)[0])
    assert torch.equal(x[1], vizcnn.preprocess(demo, shapes200.render(2).image)[0])
    assert 6 not in top.indices["features.10"]


def test_bad_arguments(demo, tmp_path):
    with pytest.raises(vizcnn.LayerNotFound, match="did you mean"):
        scan_topk(demo, "shapes:5", ["features.99"], progress=False)
    with pytest.raises(vizcnn.BadArgument, match="k must be a positive integer"):
        scan_topk(demo, "shapes:5", LAYERS, k=0, progress=False)
    with pytest.raises(vizcnn.BadArgument, match="bad data set"):
        scan_topk(demo, "shapes:x", LAYERS, progress=False)
    with pytest.raises(vizcnn.BadArgument, match="not a folder"):
        scan_topk(demo, str(tmp_path / "missing"), LAYERS, progress=False)
    with pytest.raises(vizcnn.BadArgument, match="no images in"):
        scan_topk(demo, str(tmp_path), LAYERS, progress=False)
    assert hooks_left(demo) == []


def test_no_hook_left_when_the_data_fails(demo, shapes200):
    with pytest.raises(OSError):
        scan_topk(demo, Interrupting(shapes200, stop_after=10, error=OSError), LAYERS,
                  batch_size=4, progress=False)
    assert hooks_left(demo) == []


def test_module_called_twice_is_scanned_at_its_last_call(resnet18):
    """ResNet's block relu runs twice; the scan sees the block's output, as capture does."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 64, 64)
    top = scan_topk(resnet18, x, ["layer1.0.relu"], k=2, progress=False)
    maps = vizcnn.activations(resnet18, x, ["layer1.0.relu"])["layer1.0.relu"]
    assert torch.equal(top.values["layer1.0.relu"][:, 0], maps.amax(dim=(0, 2, 3)))


def test_killed_scan_resumes(demo, tmp_path):
    """A real SIGKILL in the middle of a scan that saves after every batch: the state on disk
    is whole, and resuming from it gives the uninterrupted result."""
    import os
    import signal
    import subprocess
    import sys
    import time

    state = tmp_path / "state"
    child = (
        "import time, vizcnn\n"
        "from vizcnn.data.shapes import HELD_OUT_SEED, ShapesDataset\n"
        "data = ShapesDataset(1500, seed=HELD_OUT_SEED)\n"
        "def slow():\n"
        "    for i in range(len(data)):\n"
        "        time.sleep(0.004)\n"
        "        yield data[i]\n"
        "vizcnn.scan_topk(vizcnn.load_model('demo'), slow(), ['features.10'], batch_size=16,\n"
        f"                 state_path={str(state)!r}, save_every=0, progress=False)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (state / "topk.pt").exists() and TopK.load(state).count >= 160:
                break
            assert process.poll() is None, "the scan ended before it could be killed"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    saved = TopK.load(state)
    assert 160 <= saved.count < 1500
    from vizcnn.data.shapes import HELD_OUT_SEED, ShapesDataset

    data = ShapesDataset(1500, seed=HELD_OUT_SEED)
    same = (data[i] for i in range(len(data)))  # a generator again: its data cannot be checked
    resumed = scan_topk(demo, same, ["features.10"], state_path=state, progress=False)
    assert_same(resumed, scan_topk(demo, "shapes:1500", ["features.10"], progress=False))


def test_a_scan_across_processes_equals_one_process(demo, tmp_path):
    """Two ranks (torch.distributed, gloo) each scan half of the data; the merged lists equal
    the single-process scan exactly, ties included."""
    import torch.multiprocessing as mp
    from helpers import distributed_scan_worker

    out = tmp_path / "merged"
    layers = [*LAYERS, "features.11"]  # after a ReLU: channels silent on many images tie at 0
    mp.spawn(distributed_scan_worker, nprocs=2,
             args=(2, str(tmp_path / "store"), str(out), "shapes:70", layers))
    merged = TopK.load(out)
    single = scan_topk(demo, "shapes:70", layers, progress=False)
    assert (single.values["features.11"] == 0).any()  # the tie-break is exercised
    assert merged.count == 70
    assert_same(merged, single)


# --------------------------------------------------------------------------- decoding workers


class _Noisy(Dataset):
    """Float images of odd sizes (a size change closes a batch), one with a NaN and one that
    cannot be read: the order, the batches and the skipped list must not depend on workers."""

    def __init__(self):
        generator = torch.Generator().manual_seed(3)
        self.images = [torch.randn(3, 40 if i < 23 else 48, 40, generator=generator)
                       for i in range(37)]
        self.images[5][0, 3, 3] = float("nan")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if index == 11:
            raise vizcnn.BadImage(f"image {index} is unreadable")
        return self.images[index], index % 3


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_same_batches_skips_and_scan(demo, tmp_path, shapes200, workers):
    from vizcnn.scan import in_memory, input_batches

    root = tmp_path / "images"
    root.mkdir()
    for index in range(40):
        image = shapes200.render(index).image
        cv2.imwrite(str(root / f"{index:02d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (root / "17_broken.png").write_bytes(b"not a png")
    for data in (str(root), _Noisy()):
        alone = list(input_batches(demo, data, 8, workers=0))
        shared = list(input_batches(demo, data, 8, workers=workers))
        assert [(i, s) for i, _, s in alone] == [(i, s) for i, _, s in shared]
        assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(alone, shared,
                                                                     strict=True))
    assert any("NaN" in reason for _, _, skipped in alone for _, reason in skipped)
    top = scan_topk(demo, str(root), LAYERS, k=5, workers=0, progress=False)
    assert_same(top, scan_topk(demo, str(root), LAYERS, k=5, workers=workers, progress=False))
    assert len(top.skipped) == 1 and "17_broken.png" in top.skipped[0]
    tidy = tmp_path / "tidy"
    tidy.mkdir()
    for path in sorted(root.glob("[0-9][0-9].png")):
        (tidy / path.name).write_bytes(path.read_bytes())
    read = [in_memory(demo, str(tidy), workers=w) for w in (0, workers)]
    assert torch.equal(read[0].inputs, read[1].inputs) and read[0].labels == read[1].labels


def test_workers_mistakes_are_one_line(demo, capsys, tmp_path):
    from vizcnn.cli import main

    with pytest.raises(vizcnn.BadArgument, match="workers must be a whole number"):
        scan_topk(demo, "shapes:4", LAYERS, workers=-1, progress=False)
    code = main(["topk", "demo", "shapes:4", "--layer", "features.3", "--workers", "-1",
                 "--out", str(tmp_path / "top")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "workers must be a whole number" in err
