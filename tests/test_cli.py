"""The command line: summary output, and one clear line with exit 2 for each user mistake."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

import pytest
import torch

import vizcnn
from vizcnn.cli import EXAMPLES, build_parser, main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def row(out: str, layer: str) -> list[str]:
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] == layer:
            return cells
    raise AssertionError(f"{layer} not in the summary")


def test_summary_alexnet(capsys):
    code, out, err = run(capsys, "summary", "torchvision:alexnet")
    assert code == 0 and err == ""
    assert row(out, "features.10") == ["features.10", "Conv2d", "256x13x13", "163", "16",
                                       "590,080"]
    assert row(out, "classifier.6")[3:5] == ["global", "-"]


def test_summary_vgg16_with_layer_filter(capsys):
    code, out, _ = run(capsys, "summary", "torchvision:vgg16", "--input-size", "224", "224",
                       "--layer", "features.28", "--layer", "features.30")
    assert code == 0
    assert row(out, "features.28")[2:5] == ["512x14x14", "196", "16"]
    assert row(out, "features.30")[2:5] == ["512x7x7", "212", "32"]
    assert len([line for line in out.splitlines() if line.startswith("features.")]) == 2


def test_summary_resnet18_uses_gradient_fields(capsys):
    code, out, _ = run(capsys, "summary", "torchvision:resnet18", "--layer", "layer4",
                       "--layer", "fc")
    assert code == 0
    assert row(out, "layer4")[2:5] == ["512x7x7", "435", "32"]
    assert row(out, "fc")[3] == "global"


def test_activations_command(capsys, photo_path, tmp_path):
    out_file = tmp_path / "deep" / "acts.pt"
    code, out, _ = run(capsys, "activations", "torchvision:alexnet", photo_path,
                       "--layer", "features.0", "--layer", "features.10", "--out", str(out_file))
    assert code == 0 and "features.10" in out and "256x13x13" in out
    saved = torch.load(out_file)
    assert saved["features.0"].shape == (1, 64, 55, 55) and saved["features.0"].min() < 0
    assert [p.name for p in out_file.parent.iterdir()] == ["acts.pt"]  # no temporary left


@pytest.fixture(scope="module")
def mistake_files(tmp_path_factory):
    """The files the user-mistake cases read, written once for all of them."""
    from helpers import TinyChain

    folder = tmp_path_factory.mktemp("mistakes")
    corrupt_checkpoint = folder / "corrupt.pt"
    corrupt_checkpoint.write_bytes(b"\x80\x02 this is no checkpoint" * 10)
    corrupt_image = folder / "corrupt.jpg"
    corrupt_image.write_bytes(b"\xff\xd8\xff\xe0 broken jpeg" * 10)
    torch.manual_seed(0)
    tiny = TinyChain().eval()
    return {"folder": str(folder), "corrupt checkpoint": str(corrupt_checkpoint),
            "corrupt image": str(corrupt_image), "pickled": _pickled(folder, tiny),
            "state_dict": _state_dict(folder, tiny), "scripted": _scripted(folder, tiny)}


MISTAKES = {  # case: (argv from the prepared files, what the one line must say)
    "unknown architecture": (lambda f: ["summary", "torchvision:alexnett"],
                             "did you mean alexnet"),
    "missing file": (lambda f: ["summary", f["folder"] + "/none.pt"], "not found"),
    "corrupt checkpoint": (lambda f: ["summary", f["corrupt checkpoint"], "--arch", "alexnet"],
                           "not a readable PyTorch checkpoint"),
    "unknown layer in summary": (
        lambda f: ["summary", "torchvision:alexnet", "--layer", "features.13"], "did you mean"),
    "unknown layer in activations": (lambda f: ["activations", "torchvision:alexnet",
                                                f["photo"], "--layer", "feature.10"],
                                     "'features.10'"),
    "missing image": (lambda f: ["activations", "torchvision:alexnet", f["folder"] + "/no.png",
                                 "--layer", "features.0"], "not found"),
    "corrupt image": (lambda f: ["activations", "torchvision:alexnet", f["corrupt image"],
                                 "--layer", "features.0"], "corrupt"),
    "input too small": (lambda f: ["summary", "torchvision:alexnet", "--input-size", "40", "40"],
                        "too small"),
    "unwritable output": (lambda f: ["activations", "torchvision:alexnet", f["photo"], "--layer",
                                     "features.0", "--out", "/proc/no/such/dir/a.pt"],
                          "output folder"),
    "untrusted pickle": (lambda f: ["summary", f["pickled"]], "--trust-checkpoint"),
    "state_dict without arch": (lambda f: ["summary", f["state_dict"]], "--arch"),
    "torchscript summary": (lambda f: ["summary", f["scripted"]], "TorchScript"),
    "bad option": (lambda f: ["summary", "torchvision:alexnet", "--input-size", "big", "9"],
                   "invalid int"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_user_mistakes_give_one_line_and_exit_2(case, capsys, mistake_files, photo_path):
    make_argv, expected = MISTAKES[case]
    argv = make_argv({**mistake_files, "photo": photo_path})
    if case == "bad option":
        with pytest.raises(SystemExit) as exited:
            main(argv)
        code = exited.value.code
        err = capsys.readouterr().err
    else:
        code, _, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("vizcnn: error:") and expected in err
    assert "Traceback" not in err


def _pickled(tmp_path, model):
    path = tmp_path / "full.pt"
    torch.save(model, path)
    return str(path)


def _scripted(tmp_path, model):
    path = tmp_path / "scripted.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 32, 32)), str(path))
    return str(path)


def _state_dict(tmp_path, model):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_trusted_pickle_loads_from_the_cli(capsys, tmp_path, tiny_chain):
    code, out, _ = run(capsys, "summary", _pickled(tmp_path, tiny_chain), "--trust-checkpoint",
                       "--input-size", "32", "32")
    assert code == 0 and row(out, "features.3")[2:5] == ["6x6x6", "13", "4"]


def test_console_script_runs_as_a_program(tmp_path):
    """The installed entry point: version, and an error without a traceback."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "vizcnn.cli"]
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("vizcnn ")
    bad = subprocess.run([*command, "summary", str(tmp_path / "missing.pt")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_maps_filters_and_shapes_images(capsys, tmp_path):
    maps = tmp_path / "x.png"
    code, out, _ = run(capsys, "maps", "demo", "shapes:3", "--layer", "features.0", "--out",
                       str(maps))
    assert code == 0 and maps.stat().st_size > 10_000 and str(maps) in out
    filters = tmp_path / "f.svg"
    code, _, _ = run(capsys, "filters", "torchvision:alexnet", "--out", str(filters))
    assert code == 0 and filters.read_text().lstrip().startswith("<?xml")
    code, _, _ = run(capsys, "filters", "demo", "--layer", "features.3", "--mode", "channels",
                     "--out", str(tmp_path / "f3.pdf"))
    assert code == 0 and (tmp_path / "f3.pdf").read_bytes().startswith(b"%PDF")
    code, out, _ = run(capsys, "activations", "demo", "shapes:0", "--layer", "features.10")
    assert code == 0 and "96x7x7" in out  # conv5 of ZFNetMini


@pytest.mark.parametrize("argv, expected", [
    (["maps", "demo", "shapes:-1", "--layer", "features.0"], "shapes index must be >= 0"),
    (["maps", "demo", "shapes:two", "--layer", "features.0"], "shapes:INDEX"),
    (["maps", "demo", "shapes:3", "--layer", "features.99"], "not found"),
    (["maps", "demo", "shapes:3", "--layer", "classifier.1"], "no feature maps"),
    (["filters", "demo", "--layer", "features.1"], "not a conv layer"),
    (["filters", "demo", "--layer", "features.13"], "not found"),
    (["filters", "torchvision:alexnet", "--layer", "classifier.1"], "not a conv layer"),
])
def test_demo_world_mistakes(argv, expected, capsys, tmp_path):
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "out.png"))
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_deconv_command(capsys, tmp_path):
    out = tmp_path / "deconv.png"
    code, text, err = run(capsys, "deconv", "demo", "shapes:3", "--layer", "features.3",
                          "--channel", "4", "--out", str(out))
    assert code == 0 and out.stat().st_size > 10_000 and str(out) in text
    assert "strongest unit of channel 4" in text
    code, _, _ = run(capsys, "deconv", "demo", "shapes:3", "--layer", "features.3", "--channel",
                     "4", "--mode", "map", "--out", str(tmp_path / "map.svg"))
    assert code == 0 and (tmp_path / "map.svg").read_text().lstrip().startswith("<?xml")


def test_topk_command_writes_figures_and_the_scan(capsys, tmp_path):
    out = tmp_path / "top"
    code, text, _ = run(capsys, "topk", "demo", "shapes:40", "--layer", "features.3",
                        "--layer", "features.10", "--k", "4", "--channels", "0-2,5",
                        "--out", str(out))
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["fig2_features.10.png",
                                                     "fig2_features.3.png", "topk"]
    top = vizcnn.TopK.load(out / "topk")
    assert top.count == 40 and top.k == 4 and top.values["features.3"].shape == (96, 4)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no state left


def test_interrupted_topk_resumes(capsys, tmp_path, monkeypatch):
    """Ctrl-C during the scan: exit 130, no output folder, the state kept; the same command
    again resumes from the state and finishes."""
    import vizcnn.scan

    real = vizcnn.scan.forward_to
    calls = {"count": 0}

    def interrupt_on_third(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(vizcnn.scan, "forward_to", interrupt_on_third)
    out = tmp_path / "top"
    argv = ["topk", "demo", "shapes:100", "--layer", "features.6", "--batch-size", "16",
            "--out", str(out)]
    code, _, err = run(capsys, *argv)
    assert code == 130 and "resume" in err and not out.exists()
    state = tmp_path / ".top.scan-state"
    assert vizcnn.TopK.load(state).count == 32
    code, text, _ = run(capsys, *argv)
    assert code == 0 and "resuming" in text and not state.exists()
    expected = vizcnn.scan_topk(vizcnn.load_model("demo"), "shapes:100", ["features.6"],
                                progress=False)
    assert torch.equal(vizcnn.TopK.load(out / "topk").indices["features.6"],
                       expected.indices["features.6"])


@pytest.mark.parametrize("argv, expected", [
    (["deconv", "demo", "shapes:3", "--layer", "features.33", "--channel", "1"],
     "did you mean"),
    (["deconv", "demo", "shapes:3", "--layer", "features.3", "--channel", "96"],
     "channel 96 out of range"),
    (["deconv", "demo", "shapes:3", "--layer", "features.3", "--channel", "1", "--mode",
      "mean"], "invalid choice: 'mean'"),
    (["topk", "demo", "shapes:10", "--layer", "features.33"], "did you mean"),
    (["topk", "demo", "shapes:10", "--layer", "features.3", "--channels", "90-99"],
     "channel 96 out of range"),
    (["topk", "demo", "shapes:10", "--layer", "features.3", "--channels", "a-b"],
     "bad channel list"),
    (["topk", "demo", "shapes:0", "--layer", "features.3"], "bad data set"),
    (["topk", "demo", "/no/such/folder", "--layer", "features.3"], "not a folder"),
    (["topk", "demo", "shapes:10", "--layer", "features.3", "--k", "0"], "k must be"),
])
def test_deconv_and_topk_mistakes(argv, expected, capsys, tmp_path):
    out = tmp_path / "out.png"
    if "--mode" in argv:
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--out", str(out)])
        code, err = exited.value.code, capsys.readouterr().err
    else:
        code, _, err = run(capsys, *argv, "--out", str(out))
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists()


def test_topk_refuses_to_replace_a_foreign_folder(capsys, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code, _, err = run(capsys, "topk", "demo", "shapes:10", "--layer", "features.3", "--out",
                       str(mine))
    assert code == 2 and "not a vizcnn top-k output" in err
    assert (mine / "notes.txt").read_text() == "precious"


def test_occlusion_command(capsys, tmp_path):
    out = tmp_path / "occ.png"
    code, text, _ = run(capsys, "occlusion", "demo", "shapes:2", "--layer", "features.11",
                        "--stride", "8", "--out", str(out))
    assert code == 0 and out.stat().st_size > 10_000
    assert "engine incremental" in text and "lowest p(star)" in text
    code, text, _ = run(capsys, "occlusion", "demo", "shapes:2", "--target", "star",
                        "--approx", "--stride", "4", "--out", str(tmp_path / "occ.pdf"))
    assert code == 0 and "re-checked positions" in text
    assert (tmp_path / "occ.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize("argv, expected", [
    (["--window", "65"], "window 65x65 is larger than the image 64x64"),
    (["--stride", "0"], "stride must be a positive integer"),
    (["--layer", "features.11", "--channel", "128"], "channel 128 out of range"),
    (["--layer", "classifier.1"], "has no spatial output"),
    (["--layer", "features.111"], "did you mean"),
    (["--target", "blob"], "unknown class 'blob'"),
    (["--target", "8"], "target class 8 out of range"),
    (["--approx", "2"], "approx must be"),
])
def test_occlusion_mistakes(argv, expected, capsys, tmp_path):
    out = tmp_path / "occ.png"
    code, _, err = run(capsys, "occlusion", "demo", "shapes:2", *argv, "--out", str(out))
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


# --------------------------------------------------------------------------- --help examples

_EXAMPLE_LINES = [line for lines in EXAMPLES.values() for line in lines]
_SLOW = ("demo", "train-demo")  # run in full by test_demo; here: they parse


def test_every_subcommand_help_ends_with_examples():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(EXAMPLES)
    for name, sub in commands.choices.items():
        text = sub.format_help()
        assert text.rstrip().endswith(EXAMPLES[name][-1]), name
        assert all(line in text for line in EXAMPLES[name])


@pytest.mark.parametrize("line", _EXAMPLE_LINES)
def test_help_examples_run_as_written(line, tmp_path, monkeypatch, capsys):
    argv = shlex.split(line)
    assert argv[0] == "vizcnn"
    monkeypatch.chdir(tmp_path)
    if argv[1] in _SLOW:
        assert build_parser().parse_args(argv[1:]).run is not None
        return
    code, out, err = run(capsys, *argv[1:])
    assert code == 0, err
    if "--out" in argv:
        written = tmp_path / argv[argv.index("--out") + 1]
        assert written.exists() and f"wrote {written.name}" in out.replace(str(tmp_path) + "/", "")
