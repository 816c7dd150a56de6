"""Trust on models unlike ours and on hostile input: no silent wrong answer, no code run without
consent, no output lost, one clear line for every mistake (through the API and the CLI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.robust import FGSM
from helpers import CALLED, assert_unchanged, one_channel_net, snapshot, tuple_net
from torch import nn

import vizcnn
from vizcnn.cli import main
from vizcnn.deconv import Deconvnet, RectificationWarning
from vizcnn.hooks import run_forward
from vizcnn.io import atomic_path, recover
from vizcnn.models import AssumedPreprocessingWarning, Preprocessing
from vizcnn.probes.adversarial import excite, fgsm, lbfgs_adversarial, pgd
from vizcnn.probes.invariance import invariance
from vizcnn.probes.occlusion import occlusion

PLAIN = Preprocessing(resize=None, crop=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, *argv, expected: str) -> str:
    """Run the CLI and check it failed the way users should see it: exit 2, one line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("vizcnn: error:") and "Traceback" not in err
    assert expected in err, err
    return err


def small_image(tmp_path, name="image.png", size=(40, 48)) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path / name
    cv2.imwrite(str(path), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return str(path)


def state_dict_file(tmp_path, model: nn.Module, name="weights.pt", **extra) -> str:
    path = tmp_path / name
    torch.save({"state_dict": model.state_dict(), **extra}, path)
    return str(path)


# --------------------------------------------------------------------------- FGSM on every pixel


class Scaled(nn.Module):
    """A classifier whose logits are scaled by ``scale``: tiny scales give tiny gradients."""

    def __init__(self, scale: float):
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(3),
                                 nn.Flatten(), nn.Linear(54, 4))
        self.scale = scale

    def forward(self, x):
        return self.net(x) * self.scale


@pytest.mark.parametrize("scale", [1.0, 1e-4])
@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_steps_every_pixel(scale, targeted):
    model = Scaled(scale).eval()
    torch.manual_seed(6)
    x = torch.rand(3, 3, 20, 20) * 0.6 + 0.2  # pixels inside (0, 1): no clipping at eps
    steps = Preprocessing(resize=None, crop=None, mean=(0.0,) * 3, std=(1.0,) * 3)
    target = torch.tensor([1, 2, 3]) if targeted else None
    eps = 0.05
    result = fgsm(model, x, eps, target=target, preprocessing=steps)
    # the closed form, by hand
    pixels = x.clone().requires_grad_(True)
    logits = model(pixels)
    labels = target if targeted else logits.argmax(1)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), pixels)
    expected = (x + eps * (-grad.sign() if targeted else grad.sign())).clamp(0, 1)
    assert (grad != 0).float().mean() > 0.99
    assert torch.equal(result.perturbation.abs() > 0, grad != 0)
    assert (result.x - expected).abs().max() < 1e-6
    if scale < 1:  # Captum's FGSM, whose 1e-6 threshold this model's gradients fall under
        captum = FGSM(model, lower_bound=0.0, upper_bound=1.0,
                      loss_func=lambda out, y: F.cross_entropy(out, y, reduction="none"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skipped = captum.perturb(x.clone(), eps, labels, targeted=targeted)
        assert ((skipped - x).abs() == 0).float().mean() > 0.5


# --------------------------------------------------------------------------- normalisation


def test_unknown_normalisation_is_refused_not_guessed(tiny_chain):
    model = tiny_chain  # an nn.Module of its own: vizcnn knows nothing of its input
    x = torch.randn(1, 3, 32, 32)
    image = np.zeros((32, 32, 3), np.uint8)
    calls = {
        "fgsm": lambda **kw: fgsm(model, x, 2 / 255, **kw),
        "pgd": lambda **kw: pgd(model, x, 2 / 255, steps=2, **kw),
        "lbfgs_adversarial": lambda **kw: lbfgs_adversarial(model, x, searches=1,
                                                            max_iterations=2, **kw),
        "excite": lambda **kw: excite(model, x, "features.3", 0, steps=2, **kw),
        "invariance": lambda **kw: invariance(model, image, "rotate", (0, 90),
                                              layers=("features.0", "features.3"), **kw),
        "occlusion": lambda **kw: occlusion(model, x, window=8, stride=8, progress=False, **kw),
    }
    for name, call in calls.items():
        with pytest.raises(vizcnn.BadArgument, match=r"needs the model's input normalisation"
                           r".*preprocessing=vizcnn.Preprocessing") as caught:
            call()
        assert name.split("_")[0] in str(caught.value)
        call(preprocessing=PLAIN)  # given, it runs
    with pytest.warns(AssumedPreprocessingWarning, match="assumed mean"):
        vizcnn.preprocess(model, image)


def test_value_range_and_a_model_that_takes_minus_one_to_one(tiny_chain):
    """A network whose input is pixels in [-1, 1]: eps stays in pixel units."""
    steps = Preprocessing(resize=None, crop=None, mean=(0.5,) * 3, std=(0.5,) * 3)
    same = Preprocessing(resize=None, crop=None, mean=(127.5,) * 3, std=(127.5,) * 3,
                         value_range=(0.0, 255.0))
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = vizcnn.preprocess(tiny_chain, image, preprocessing=steps)
    assert torch.allclose(x, vizcnn.preprocess(tiny_chain, image, preprocessing=same))
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9
    result = fgsm(tiny_chain, x, 2 / 255, preprocessing=steps)
    assert float(result.linf.max()) <= 2 / 255 + 1e-6
    assert (result.x - x).abs().max() <= 2 * 2 / 255 + 1e-5  # the input moves by eps / std


def test_cli_takes_the_normalisation(capsys, tmp_path):
    model = tuple_net()
    weights = state_dict_file(tmp_path, model)
    image = small_image(tmp_path, size=(32, 32))
    out = str(tmp_path / "adv.png")
    one_line_error(capsys, "adversarial", weights, image, "--arch", "helpers:tuple_net",
                   "--output", "0", "--out", out, expected="--mean and --std")
    code = main(["adversarial", weights, image, "--arch", "helpers:tuple_net", "--output", "0",
                 "--mean", "0.5", "--std", "0.25", "--out", out])
    assert code == 0 and Path(out).is_file()


# --------------------------------------------------------------------------- output selection


def test_probes_select_class_scores_from_a_tuple():
    model = tuple_net()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(vizcnn.BadArgument, match=r"a tuple of 2: \[0\] Tensor \(1, 6\), \[1\] "
                       r"Tensor \(1, 4\); select the class scores with output="):
        occlusion(model, x, window=8, stride=8, fill=0.0, progress=False)

    class Scores(nn.Module):  # the independent answer: a model that returns the scores alone
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t)[0]

    for engine in ("incremental", "naive"):
        selected = occlusion(model, x, window=8, stride=4, fill=0.0, output=0, engine=engine,
                             layer="conv2", progress=False)
        plain = occlusion(Scores(model).eval(), x, window=8, stride=4, fill=0.0,
                          engine="naive", layer="inner.conv2", progress=False)
        assert torch.allclose(selected.prob, plain.prob, atol=1e-5)
        assert torch.allclose(selected.activation, plain.activation, rtol=1e-5)
    by_callable = fgsm(model, x, 4 / 255, preprocessing=PLAIN, output=lambda out: out[0])
    assert torch.equal(by_callable.x, fgsm(Scores(model).eval(), x, 4 / 255,
                                           preprocessing=PLAIN).x)
    with pytest.raises(vizcnn.BadArgument, match="cannot select 5"):
        fgsm(model, x, 4 / 255, preprocessing=PLAIN, output=5)
    with pytest.raises(vizcnn.BadArgument, match=r"selected output is a Tensor \(4,\)"):
        pgd(model, x, 4 / 255, preprocessing=PLAIN, output=lambda out: out[1][0])


def test_cli_output_selector(capsys, tmp_path):
    weights = state_dict_file(tmp_path, tuple_net())
    image = small_image(tmp_path, size=(32, 32))
    base = ["occlusion", weights, image, "--arch", "helpers:tuple_net", "--mean", "0.5",
            "--std", "0.25", "--window", "8", "--stride", "8", "--out", str(tmp_path / "o.png")]
    one_line_error(capsys, *base, expected="--output INDEX|KEY")
    assert main([*base, "--output", "0"]) == 0


# --------------------------------------------------------------------------- stop at the layer


def test_conv_layers_at_sizes_the_head_rejects(capsys):
    model = tuple_net()  # its linear heads take 32 x 32 inputs only
    x = torch.randn(2, 3, 48, 40)
    with pytest.raises(vizcnn.ModelError, match="at layer 'classes'.*mat1 and mat2"):
        run_forward(model, x)  # the whole model rejects this size
    field = vizcnn.receptive_field(model, "conv2", (48, 40))
    assert field.size == (9, 9) and field.jump == (2, 2)  # 3, + 2 x 1 (pool), + 2 x 2
    assert vizcnn.activations(model, x, ["conv2"])["conv2"].shape == (2, 8, 24, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RectificationWarning)
        projection = Deconvnet(model).project(x, "conv2", 3)
    assert projection.shape == x.shape and projection.abs().sum() > 0
    top = vizcnn.scan_topk(model, x, ["conv2"], k=2, progress=False)
    assert top.values["conv2"].shape == (8, 2)
    with pytest.raises(vizcnn.VizCNNError, match="classes"):
        vizcnn.activations(model, x, ["classes"])


def test_summary_shows_the_rows_before_a_head_that_rejects_the_size(capsys, tmp_path):
    weights = state_dict_file(tmp_path, tuple_net())
    code = main(["summary", weights, "--arch", "helpers:tuple_net", "--input-size", "48", "48"])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "at layer 'classes'" in err and "mat1 and mat2" in err
    lines = out.splitlines()
    assert any(line.startswith("conv2 ") and "8x24x24" in line for line in lines)
    assert not any(line.startswith("classes ") for line in lines)


# --------------------------------------------------------------------------- NaN and inf


def test_nan_images_are_skipped_by_the_scan_and_refused_by_probes(tiny_chain):
    x = torch.randn(5, 3, 32, 32)
    x[1, 0, 3, 3] = float("nan")
    x[3, 2, 0, 0] = float("inf")
    top = vizcnn.scan_topk(tiny_chain, x, ["features.3"], k=5, progress=False)
    assert set(top.indices["features.3"].flatten().tolist()) == {-1, 0, 2, 4}  # -1: empty
    assert len(top.skipped) == 2 and "image 1: NaN" in top.skipped[0]
    for call in (lambda: occlusion(tiny_chain, x, window=8, stride=8, fill=0.0),
                 lambda: fgsm(tiny_chain, x, 0.01, preprocessing=PLAIN),
                 lambda: Deconvnet(tiny_chain).project(x, "features.3", 0)):
        with pytest.raises(vizcnn.BadArgument, match="image 1 of the batch has NaN"):
            call()


# --------------------------------------------------------------------------- consent


@pytest.mark.parametrize("arch", ["helpers:record_call", "this:x"])
def test_code_named_in_a_checkpoint_never_runs_without_consent(arch, tmp_path, capfd):
    model = vizcnn.models.demo_network()
    path = state_dict_file(tmp_path, model, arch=arch)
    CALLED.clear()
    with pytest.raises(vizcnn.BadCheckpoint, match="code to import and call.*--trust-checkpoint"):
        vizcnn.load_model(path)
    assert CALLED == [] and capfd.readouterr().out == ""  # nothing imported, nothing printed
    one_line_error(capfd, "summary", path, expected="--trust-checkpoint")
    if arch == "helpers:record_call":
        weights = state_dict_file(tmp_path, one_channel_net(), "gray.pt", arch=arch)
        vizcnn.load_model(weights, trust_checkpoint=True)  # consent: the file's arch runs
        assert CALLED == ["record_call"]
        vizcnn.load_model(weights, arch="helpers:one_channel_net")  # typed by the user


def test_pickles_say_they_need_consent_without_noise(tmp_path, capfd):
    path = tmp_path / "raw.pkl"
    import pickle

    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UserWarning from torch before our line
        with pytest.raises(vizcnn.BadCheckpoint, match="runs code from the file.*--trust"):
            vizcnn.load_model(path)
    capfd.readouterr()
    err = one_line_error(capfd, "summary", str(path), expected="--trust-checkpoint")
    assert "UserWarning" not in err


# --------------------------------------------------------------------------- crash-safe outputs

def write_folder(target: Path, tag: str) -> None:
    """An output folder of 16 files, each holding ``tag``, written as vizcnn writes outputs."""
    with atomic_path(target) as staging:
        staging.mkdir()
        for i in range(16):
            (staging / f"part{i:02d}.txt").write_text(tag)


def killed_writing(target: Path, tag: str, kill_at: str) -> int:
    """``write_folder`` in a child process that is SIGKILLed at the step ``kill_at``."""
    code = ("import sys; sys.path[:0] = [sys.argv[3], sys.argv[4]]\n"
            "from test_trust import write_folder; from pathlib import Path\n"
            "write_folder(Path(sys.argv[1]), sys.argv[2])\n")
    env = {**os.environ, "VIZCNN_TEST_KILL_AT": kill_at}
    return subprocess.run([sys.executable, "-c", code, str(target), tag, str(ROOT),
                           str(ROOT / "tests")], env=env).returncode


def whole(target: Path) -> str:
    """The tag of a whole output folder (all 16 parts, one tag), else an AssertionError."""
    files = sorted(p.name for p in target.iterdir())
    assert files == [f"part{i:02d}.txt" for i in range(16)], files
    tags = {(target / name).read_text() for name in files}
    assert len(tags) == 1, tags
    return tags.pop()


@pytest.mark.parametrize("step", ["written", "aside", "placed"])
def test_a_kill_at_any_step_of_a_replace_leaves_one_whole_output(step, tmp_path):
    target = tmp_path / "out"
    write_folder(target, "old")
    assert killed_writing(target, "new", step) == -signal.SIGKILL
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "out")
    if step == "aside":  # between the renames: the old output whole, aside; the new, partial
        assert not target.exists() and len(leftovers) == 2
        assert whole(tmp_path / ".out.vizcnn-old") == "old"
    else:
        assert whole(target) == {"written": "old", "placed": "new"}[step]
        assert len(leftovers) == 1  # the killed run's partial folder, or the old one aside
    recover(target)  # what the next write does first
    assert whole(target) == {"written": "old", "aside": "old", "placed": "new"}[step]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    write_folder(target, "newer")  # and the next write works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left behind


def test_a_kill_between_the_renames_is_undone_by_the_next_command(tmp_path, capsys):
    out = tmp_path / "top"
    argv = ["topk", "demo", "shapes:24", "--layer", "features.0", "--channels", "0-3",
            "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VIZCNN_TEST_KILL_AT": "aside"}
    killed = subprocess.run([sys.executable, "-m", "vizcnn.cli", *argv], env=env,
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL and not out.exists()  # the old one is aside
    assert main(argv) == 0  # restored, then replaced: no "not a vizcnn output" refusal
    assert (out / "topk" / "manifest.json").is_file() and (out / "fig2_features.0.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["top"]


# --------------------------------------------------------------------------- resumed scans


def test_a_resumed_scan_refuses_other_data(tmp_path, capsys):
    folders = []
    for name, seed in (("a", 1), ("b", 2)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(3):
            cv2.imwrite(str(folder / f"{i}.png"),
                        np.random.default_rng(seed * 10 + i).integers(0, 255, (64, 64, 3),
                                                                      dtype=np.uint8))
        folders.append(folder)
    model = vizcnn.load_model("demo")
    state = tmp_path / ".top.scan-state"
    vizcnn.scan_topk(model, str(folders[0]), ["features.6"], state_path=state, progress=False)
    with pytest.raises(vizcnn.BadArgument, match=r"other data .*delete '.*scan-state' to start"):
        vizcnn.scan_topk(model, str(folders[1]), ["features.6"], state_path=state,
                         progress=False)
    one_line_error(capsys, "topk", "demo", str(folders[1]), "--layer", "features.6",
                   "--out", str(tmp_path / "top"), expected="is for another scan (other data")
    (state / "topk.pt").write_bytes(b"garbage")
    one_line_error(capsys, "topk", "demo", str(folders[1]), "--layer", "features.6",
                   "--out", str(tmp_path / "top"), expected=f"delete '{state}'")


# --------------------------------------------------------------------------- occlusion engine


def test_occlusion_stays_incremental_through_other_activations(monkeypatch):
    """PReLU, LeakyReLU, ELU modules and functional GELU are pointwise: no full tensor is
    built before the flatten, and the maps equal the naive engine's."""
    from vizcnn.probes import occlusion as engine

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2), nn.PReLU(8), nn.MaxPool2d(3, 2, ceil_mode=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.1), nn.ELU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 5)).eval()
    x = torch.randn(2, 3, 33, 33)
    full = []
    original = engine._Patched.full
    monkeypatch.setattr(engine._Patched, "full", lambda self: full.append(
        tuple(self.clean.shape)) or original(self))
    # the incremental engine itself: on a net this small "auto" may race it and pick naive
    fast = occlusion(model, x, window=6, stride=3, fill=0.0, layer="6", engine="incremental",
                     progress=False)
    assert fast.engine == "incremental" and all(len(shape) == 4 for shape in full)
    assert full and all(shape == (1, 8, 8, 8) for shape in full)  # only at the flatten
    naive = occlusion(model, x, window=6, stride=3, fill=0.0, layer="6", engine="naive",
                      progress=False)
    assert torch.allclose(fast.prob, naive.prob, atol=1e-5)
    assert torch.allclose(fast.activation, naive.activation, rtol=1e-5)


# --------------------------------------------------------------------------- one clear line


def test_api_mistakes_are_one_line_errors(tiny_chain):
    before = snapshot(tiny_chain)
    empty = torch.zeros(0, 3, 32, 32)
    for call in (lambda: occlusion(tiny_chain, empty, window=8, stride=8, fill=0.0),
                 lambda: fgsm(tiny_chain, empty, 0.01, preprocessing=PLAIN),
                 lambda: pgd(tiny_chain, empty, 0.01, preprocessing=PLAIN)):
        with pytest.raises(vizcnn.BadArgument, match="the image batch is empty"):
            call()
    with pytest.raises(vizcnn.BadArgument, match=r"expected an image batch \(N, C, H, W\)"):
        vizcnn.activations(tiny_chain, torch.randn(3, 32, 32), ["features.0"])
    for channel in (1.7, True):
        with pytest.raises(vizcnn.BadArgument, match="channel must be an integer"):
            Deconvnet(tiny_chain).project(torch.randn(1, 3, 32, 32), "features.3", channel)
    with pytest.raises(vizcnn.BadArgument, match="channels must be integers"):
        Deconvnet(tiny_chain).project_many(torch.randn(1, 3, 32, 32), "features.3", [1.5])
    with pytest.raises(vizcnn.BadArgument, match="approx must be"):
        occlusion(tiny_chain, torch.randn(1, 3, 32, 32), window=8, stride=8, fill=0.0,
                  approx=0)
    with pytest.raises(vizcnn.BadArgument, match="cannot run on device 'meta'"):
        vizcnn.load_model("demo", device="meta")
    gray = one_channel_net().eval()
    with pytest.raises(vizcnn.ModelError, match="takes 1-channel input, the image has 3"):
        vizcnn.activations(gray, torch.randn(1, 3, 32, 32), ["3"])
    assert_unchanged(tiny_chain, before)


def test_one_channel_models_from_the_cli(capsys, tmp_path):
    weights = state_dict_file(tmp_path, one_channel_net())
    image = small_image(tmp_path)
    base = [weights, image, "--arch", "helpers:one_channel_net"]
    assert main(["activations", *base, "--layer", "3"]) == 0  # converted to gray, warned
    out, err = capsys.readouterr()
    assert "1x40x48" in out and err.count("\n") == 1 and "vizcnn: warning:" in err
    one_line_error(capsys, "occlusion", *base, "--out", str(tmp_path / "o.png"),
                   expected="--mean and --std")
    assert main(["occlusion", *base, "--mean", "0.5", "--std", "0.2", "--window", "8",
                 "--stride", "8", "--out", str(tmp_path / "o.png")]) == 0
    assert main(["adversarial", *base, "--mean", "0.5", "--std", "0.2",
                 "--out", str(tmp_path / "a.png")]) == 0


@pytest.mark.parametrize("case", [
    "figure out is a folder", "activations out is a folder", "meta device", "huge input",
    "approx 0", "reversed channels", "excite channel", "figure suffix before work",
    "train per epoch", "truncated png",
])
def test_cli_mistakes_are_one_line(case, capfd, tmp_path):
    folder = tmp_path / "d.png"
    folder.mkdir()
    truncated = tmp_path / "cut.png"
    ok, data = cv2.imencode(".png", np.full((64, 64, 3), 99, np.uint8))
    truncated.write_bytes(data.tobytes()[:120])
    argv, expected = {
        "figure out is a folder": (["filters", "demo", "--out", str(folder)], "is a folder"),
        "activations out is a folder": (["activations", "demo", "shapes:0", "--layer",
                                         "features.0", "--out", str(folder)], "is a folder"),
        "meta device": (["summary", "demo", "--device", "meta"], "cannot run on device"),
        "huge input": (["summary", "torchvision:alexnet", "--input-size", "200000", "200000"],
                       "not enough memory"),
        "approx 0": (["occlusion", "demo", "shapes:0", "--approx", "0", "--out",
                      str(tmp_path / "o.png")], "approx must be"),
        "reversed channels": (["topk", "demo", "shapes:4", "--layer", "features.0",
                               "--channels", "5-2", "--out", str(tmp_path / "t")],
                              "reversed channel range '5-2'"),
        "excite channel": (["excite", "demo", "shapes:0", "--layer", "features.6", "--channel",
                            "128", "--out", str(tmp_path / "e.png")],
                           "channel 128 out of range: 'features.6' has 128 channels"),
        "figure suffix before work": (["occlusion", "demo", "shapes:0", "--out",
                                       str(tmp_path / "fig")], "without suffix"),
        "train per epoch": (["train-demo", "--per-epoch", "10", "--out", str(tmp_path / "r")],
                            "--per-epoch"),
        "truncated png": (["activations", "demo", str(truncated), "--layer", "features.0"],
                          "corrupt"),
    }[case]
    err = one_line_error(capfd, *argv, expected=expected)
    assert "WARN" not in err


def test_errors_are_not_printed_onto_the_progress_bar(tmp_path):
    blocker = tmp_path / "file"  # an output folder under a file cannot be created, even by root
    blocker.write_text("x")
    result = subprocess.run([sys.executable, "-m", "vizcnn.cli", "demo", "--out",
                             str(blocker / "demo")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.startswith("vizcnn: error:") and result.stderr.count("\n") == 1, \
        result.stderr


def test_cli_deconv_says_how_it_rectified(capsys, tmp_path):
    weights = state_dict_file(tmp_path, one_channel_net())
    code = main(["deconv", weights, small_image(tmp_path), "--arch", "helpers:one_channel_net",
                 "--mean", "0.5", "--std", "0.2", "--layer", "3", "--channel", "2",
                 "--out", str(tmp_path / "d.png")])
    err = capsys.readouterr().err
    assert code == 0 and (tmp_path / "d.png").is_file()
    assert err.count("\n") == 1 and err.startswith("vizcnn: warning: Sequential: the deconvnet "
                                                   "rectified its signal at PReLU x1")
