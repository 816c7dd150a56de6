"""The gallery at the size of the data (vizcnn.datapass): each image decoded once past the
memory budget, at most two forward passes of the model, the same site from the in-memory and
the on-disk paths, and the same site, report and figure from two torchrun processes as from
one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import shapes_folder

import vizcnn
from vizcnn.data.shapes import SHAPE_CONCEPTS
from vizcnn.render.gallery import write_gallery
from vizcnn.scan import ImageFolder, InMemory, in_memory

ROOT = Path(__file__).resolve().parents[1]
GALLERY = ["--layer", "features.3", "--layer", "features.6", "--channels", "0-5", "--k", "4",
           "--feature-vis-steps", "2", "--checkpoints", "demo:1", "demo:5", "demo"]


def _site_files(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in sorted(site.rglob("*"))
            if p.is_file()}


def _same_site(one: Path, other: Path) -> None:
    """Every file of two sites equal, but gallery.json's timings and rank count."""
    first, second = _site_files(one), _site_files(other)
    assert sorted(first) == sorted(second)
    for name, content in first.items():
        if name == "gallery.json":
            a, b = json.loads(content), json.loads(second[name])
            for record in (a, b):
                del record["seconds"], record["ranks"]
            assert a == b
        else:
            assert content == second[name], name


def test_each_image_is_decoded_once(tmp_path, monkeypatch):
    """A folder of images with concept masks: every file is read exactly once (the first,
    probed for the input size, is not read again), into the cache of decoded inputs that
    the later stages read; the model runs twice (the first pass, then dissection's IoU) and
    each earlier checkpoint once; the pages equal those made from the inputs decoded in
    memory beforehand (no cache)."""
    import vizcnn.data.images as images

    folder = shapes_folder(tmp_path / "shapes", 24)
    model = vizcnn.load_model("demo")
    options = dict(layers=["features.3", "features.6"], channels=list(range(4)), k=3,
                   figures=False, progress=False, feature_vis=False, command="test",
                   checkpoints=["demo:1", "demo:5"], concepts=list(SHAPE_CONCEPTS))
    masked = ImageFolder(folder, masks=folder.with_name("shapes-masks"))
    decoded = in_memory(model, masked)
    assert isinstance(decoded, InMemory)
    with pytest.warns(UserWarning, match="added as the last"):
        write_gallery(model, decoded, tmp_path / "memory", **options)
    reads: Counter = Counter()
    real = images.read_image

    def counted(path, *args, **kwargs):
        reads[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(images, "read_image", counted)
    with pytest.warns(UserWarning, match="added as the last"):
        write_gallery(model, folder, tmp_path / "disk", **options)
    assert len(reads) == 24 and set(reads.values()) == {1}
    record = json.loads((tmp_path / "disk" / "gallery.json").read_text())
    assert record["images_decoded"] == 24
    assert record["forward_passes"] == {"model": 2, "checkpoint epoch 1": 1,
                                        "checkpoint epoch 5": 1}
    assert json.loads((tmp_path / "memory" / "gallery.json").read_text())[
        "images_decoded"] == 0  # model inputs already
    assert not list(tmp_path.glob(".disk*"))  # the work folder and its cache are gone
    memory, disk = _site_files(tmp_path / "memory"), _site_files(tmp_path / "disk")
    assert sorted(memory) == sorted(disk)
    for name in memory:
        if name not in ("index.html", "gallery.json"):  # they name the data as given
            assert memory[name] == disk[name], name


def test_the_statistics_read_back_from_disk_equal_brute_force(tmp_path):
    """channel_stats keeps the per-image numbers in a table on disk; its summaries, read a
    chunk of rows at a time (a tiny chunk here), equal those of the whole tensor."""
    import vizcnn.datapass as datapass

    model = vizcnn.load_model("demo")
    stats = vizcnn.channel_stats(model, "shapes:30", ["features.3"], progress=False)
    layer = stats["features.3"]
    whole = layer.maxima.clone()
    original = datapass.TABLE_BYTES
    try:
        datapass.TABLE_BYTES = 4 * whole.shape[1] * 7  # 7 rows a chunk
        values, rows = layer.strongest()
        assert torch.equal(values, whole.max(dim=0).values)
        assert torch.equal(rows, whole.argmax(dim=0))
        assert torch.equal(layer.fire_rate, (whole > 0).float().mean(dim=0))
        counts, edges = layer.histograms(24)
        for channel in range(whole.shape[1]):
            expected, bins = np.histogram(whole[:, channel].numpy(), bins=24)
            assert (counts[channel] == expected).all()
            assert edges[channel][0] == bins[0] and edges[channel][1] == bins[-1]
        sums = torch.zeros(int(layer.labels.max()) + 1, whole.shape[1], dtype=torch.float64)
        sums.index_add_(0, layer.labels, whole.clamp_min(0).double())
        means = (sums / torch.bincount(layer.labels)[:, None]).T.float()
        assert torch.allclose(layer.class_means(), means, rtol=1e-6, equal_nan=True)
    finally:
        datapass.TABLE_BYTES = original


@pytest.mark.parametrize("block_bytes", [32 * 2**20, 4 * 200])
def test_thresholds_kept_lazily_equal_a_full_sort(block_bytes, monkeypatch):
    """Dissection's top-quantile threshold, kept as the m largest values with a rising bound,
    equals the m-th largest of all values, ties included, whether most maps pass the bound
    (compared in place) or few do (only theirs looked at); also when the merges go a channel
    or two at a time (a small block)."""
    import vizcnn.units as units
    from vizcnn.units import _Largest

    monkeypatch.setattr(units, "TABLE_BYTES", block_bytes)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 5, 5, 10, generator=generator).round(decimals=1)
               for _ in range(30)]  # (B, C, h, w) maps
    batches[7][:, 2] = -5  # a channel with nothing set aside from a batch
    for batch in batches[10:]:
        batch[1:] *= 0.1  # most maps below the bound: only those that pass are looked at
    largest = _Largest(97)
    for batch in batches:
        largest.add(batch, batch.flatten(2).max(dim=2).values)
    everything = torch.cat([batch.transpose(0, 1).flatten(1) for batch in batches], dim=1)
    kept = largest.values().sort(dim=1, descending=True).values
    assert torch.equal(kept, everything.topk(97, dim=1).values)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "vizcnn.cli", *args], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=900)


def _one_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vizcnn.cli", *args], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_torchrun_gallery_doctor_and_evolution_equal_one_process(tmp_path):
    """Two gloo ranks: the same site (pages, numbers, images), the same health report and the
    same evolution figure as one process. The data is a folder with concept masks, so that
    the statistics, the accuracy, dissection's thresholds and overlaps, the evolution's
    checkpoints, the projections and the pages are all split and merged."""
    folder = shapes_folder(tmp_path / "data" / "shapes", 37)  # odd: the shards differ
    runs = {}
    for name, run in (("one", _one_process), ("two", _torchrun)):
        cwd = tmp_path / name
        cwd.mkdir()
        for args in (["gallery", "demo", str(folder), *GALLERY, "--out", "site"],
                     ["doctor", "demo", str(folder), "--json", "health.json"],
                     ["evolution", "demo:1", "demo:5", "demo", str(folder), "--layer",
                      "features.3", "--out", "fig4.png"]):
            done = run(args, cwd)
            assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = cwd
        assert sorted(p.name for p in cwd.iterdir()) == ["fig4.png", "health.json", "site"]
    one, two = runs["one"], runs["two"]
    _same_site(one / "site", two / "site")
    assert json.loads((two / "site" / "gallery.json").read_text())["ranks"] == 2
    assert (one / "health.json").read_text() == (two / "health.json").read_text()
    assert (one / "fig4.png").read_bytes() == (two / "fig4.png").read_bytes()


def test_the_cache_holds_inputs_of_several_sizes(tmp_path):
    """Batches of two input sizes, with masks, labels and a skipped image, read back from the
    cache as the data set they came from, also after a saved state is restored (rows written
    after it dropped)."""
    from vizcnn.datapass import DecodedCache
    from vizcnn.errors import BadImage

    generator = torch.Generator().manual_seed(0)
    small = torch.randn(3, 3, 8, 6, generator=generator)
    large = torch.randn(2, 3, 10, 12, generator=generator)
    small_masks = torch.randint(0, 5, (3, 8, 6), generator=generator)
    cache = DecodedCache(tmp_path / "cache")
    cache.add([0, 2, 3], small, [1, 0, 1], small_masks, [(1, "unreadable")])
    saved = cache.state()
    cache.add([5, 6], large, None, None, [(4, "NaN values")])
    cache.restore(saved)  # as a resumed run: the second batch is written again
    cache.add([5, 6], large, None, None, [(4, "NaN values")])
    data = cache.dataset(("a", "b"))
    assert len(data) == 7
    for row, index in enumerate([0, 2, 3]):
        image, label, mask = data[index]
        assert torch.equal(image, small[row]) and label == [1, 0, 1][row]
        assert torch.equal(mask, small_masks[row])
    for row, index in enumerate([5, 6]):
        image, label, mask = data[index]
        assert torch.equal(image, large[row]) and label is None and mask is None
    for index, reason in ((1, "unreadable"), (4, "NaN values")):
        with pytest.raises(BadImage, match=reason):
            data[index]


def test_a_gallery_of_images_that_keep_their_sizes(tmp_path, capfd):
    """A model whose preprocessing is unknown keeps each image's size: over a folder of two
    sizes the statistics (through the cache, one table per size) equal a forward pass of
    each image alone, while the gallery, which tiles a channel's images, refuses the data in
    one line (API and CLI) and leaves nothing behind; with --size it is written."""
    import cv2

    from vizcnn.cli import main
    from vizcnn.errors import BadArgument
    from vizcnn.models import AssumedPreprocessingWarning
    from vizcnn.units import channel_stats

    folder = tmp_path / "photos" / "any"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 40), (33, 47), (40, 40), (33, 47), (40, 40)]):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.PReLU(),
                                torch.nn.Conv2d(4, 5, 3, stride=2), torch.nn.GELU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(5, 2)).eval()
    with pytest.warns(AssumedPreprocessingWarning):
        stats = channel_stats(model, folder.parent, ["3"], progress=False)["3"]
    for row, path in enumerate(sorted(folder.iterdir())):
        with pytest.warns(AssumedPreprocessingWarning):
            x = vizcnn.preprocess(model, path)
        with torch.no_grad():
            maps = model[:4](x)[0]
        assert torch.allclose(stats.maxima[row], maps.flatten(1).max(dim=1).values)
    with pytest.warns(AssumedPreprocessingWarning), pytest.raises(
            BadArgument, match="different sizes .33x47 and 40x40"):
        write_gallery(model, folder.parent, tmp_path / "site", layers=["1", "3"], k=2,
                      figures=False, feature_vis=False, progress=False)
    torch.save(model, tmp_path / "net.pt")
    argv = ["gallery", str(tmp_path / "net.pt"), str(folder.parent), "--layer", "3",
            "--no-figures", "--no-feature-vis", "--out", str(tmp_path / "site"), "--k", "2",
            "--trust-checkpoint"]
    assert main(argv) == 2  # the one line of error follows the assumed-normalisation warning
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("vizcnn: error:") == 1
    assert err.strip().splitlines()[-1].startswith("vizcnn: error: the images reach the model")
    assert "(--size N, or preprocessing=)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt", "photos"]
    assert main([*argv, "--size", "40"]) == 0
    assert (tmp_path / "site" / "index.html").exists()


@pytest.mark.slow
def test_an_interrupted_torchrun_gallery_resumes_per_rank(tmp_path):
    """Two gloo ranks interrupted in the middle of their pass (between batches) each keep a
    saved state of their own; run again, each resumes from it, no image fed twice, and the
    site equals one process's, the images decoded included (those the site was made from:
    the batch half decoded when the run stopped is decoded again, and counted once)."""
    import torch.multiprocessing as mp
    from helpers import resumed_gallery_worker

    options = dict(layers=["features.3", "features.6"], channels=list(range(4)), k=3,
                   batch_size=4, figures=False, feature_vis=False, progress=False)
    state = tmp_path / "state"
    mp.spawn(resumed_gallery_worker, nprocs=2,
             args=(2, str(tmp_path / "store"), 30, str(tmp_path / "two"), str(state),
                   options, 19))
    assert not state.exists()  # done: the saved states are gone
    write_gallery(vizcnn.load_model("demo"), "shapes:30", tmp_path / "one", **options)
    _same_site(tmp_path / "one", tmp_path / "two")


def test_ctrl_c_while_a_batch_is_fed_keeps_the_last_consistent_save(tmp_path):
    """A Ctrl-C that comes after one consumer took a batch and before the next did must not
    save the first with it: the resumed pass would feed it the batch twice. The save made
    after the last whole batch stands, and the resumed top-k and statistics equal an
    uninterrupted pass's."""
    from vizcnn.datapass import PassState, TopKPass, run_pass
    from vizcnn.units import StatsPass

    model = vizcnn.load_model("demo")
    layers = ["features.3", "features.11"]

    def consumers(folder: str):
        return [TopKPass(model, layers, 3, "shapes:40"), StatsPass(model, layers,
                                                                   tmp_path / folder)]

    whole = consumers("whole")
    record = run_pass("shapes:40", whole, batch_size=8, progress=False)
    resumed = consumers("resumed")
    state = PassState(tmp_path / "state", {"test": 1}, every=0)  # a save after every batch
    real, calls = StatsPass.add, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:  # the top-k has the third batch, the statistics not yet
            raise KeyboardInterrupt
        return real(self, *args)

    StatsPass.add = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_pass("shapes:40", resumed, batch_size=8, state=state, progress=False)
    finally:
        StatsPass.add = real
        resumed[1].close()  # its table files, as the gallery closes them
    assert torch.load(state.path, weights_only=True)["record"]["images"] in (8, 16)
    resumed = consumers("resumed")
    again = run_pass("shapes:40", resumed, batch_size=8, progress=False,
                     state=PassState(tmp_path / "state", {"test": 1}))
    a, b = whole[0].finish(), resumed[0].finish()
    for layer in layers:
        assert torch.equal(a.indices[layer], b.indices[layer])
        assert torch.equal(a.values[layer], b.values[layer])
    first, second = whole[1].finish(record, None), resumed[1].finish(again, None)
    for layer in layers:
        assert torch.equal(first[layer].maxima, second[layer].maxima)


def test_prefetched_batches_come_in_order_errors_where_they_happen_and_stop_early():
    """The decoding thread gives the items in order, raises a producer's error where its item
    would have come, and stops (no thread left) when the consumer leaves early."""
    import threading

    from vizcnn.datapass import prefetched

    with prefetched(iter(range(50))) as items:
        assert list(items) == list(range(50))

    def failing():
        yield 1
        raise KeyboardInterrupt  # Ctrl-C while decoding

    with prefetched(failing()) as items, pytest.raises(KeyboardInterrupt):
        assert next(items) == 1
        next(items)
    with prefetched(iter(range(10**9))) as items:
        assert next(items) == 0
    assert not [t for t in threading.enumerate() if t.name == "vizcnn-prefetch"]
