"""The command line's conventions: commands load lazily (help imports none of them), every
command is registered with its own help line, renamed flags keep their old spelling hidden,
--device is checked the same way everywhere, and compress runs without the optional packages."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import nic_fast
from nic_fast.cli import COMMANDS, LazyGroup, main
from nic_fast.devices import DeviceError, check_device
from nic_fast.synthetic import write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]
# Every command name nic-fast has had; scripts depend on them.
COMMAND_NAMES = {"compress", "encoders", "heatmap", "info", "predict", "probe", "summarize", "synth", "train",
                 "train-encoder", "verify"}
# Not needed to compress: a plain `pip install nic-fast` may lack them (cucim, dali are extras).
OPTIONAL_PACKAGES = ("kornia", "matplotlib", "nvidia", "cucim", "h5py")


def _python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_help_imports_no_command() -> None:
    code = textwrap.dedent("""
        import sys
        from nic_fast.cli import main
        try:
            main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        heavy = ("torch", "numpy", "zarr", "scipy", "rich", "PIL", "nic_fast.compress", "nic_fast.cli.compress")
        print("IMPORTED", [name for name in heavy if name in sys.modules])
    """)
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout
    for name in COMMAND_NAMES:
        assert f"\n  {name} " in result.stdout


def test_every_command_is_registered_with_its_own_help_line() -> None:
    assert COMMAND_NAMES <= set(COMMANDS)
    context = click.Context(main)
    for name, (_, help_line) in COMMANDS.items():
        command = main.get_command(context, name)
        assert isinstance(command, click.Command), name
        assert command.get_short_help_str(limit=10**6) == help_line, f"COMMANDS[{name!r}] differs from its docstring"


def test_a_command_whose_package_is_missing_fails_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_missing.py").write_text("import no_such_package_for_nic_fast\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = LazyGroup("nic-fast", lazy_commands={"needy": ("needs_missing:command", "Needs a package.")})
    listed = CliRunner().invoke(group, ["--help"])
    assert listed.exit_code == 0 and "needy  Needs a package." in listed.output
    result = CliRunner().invoke(group, ["needy"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: `nic-fast needy` needs the Python package 'no_such_package_for_nic_fast', "
                                     "which is not installed here; install it (pip install ...) and run again")


def test_renamed_flags_keep_their_old_spelling_hidden(tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("store,label\n")
    context = click.Context(main)
    train = main.get_command(context, "train")
    old = train.make_context("train", [str(table), "--out", "old-run", "--crop-px", "7"])
    new = train.make_context("train", [str(table), "-o", "new-run", "--crop-cells", "9"])
    assert (str(old.params["run_dir"]), old.params["crop_cells"]) == ("old-run", 7)
    assert (str(new.params["run_dir"]), new.params["crop_cells"]) == ("new-run", 9)
    shown = CliRunner().invoke(main, ["train", "--help"]).output
    assert "-o, --output" in shown and "--crop-cells" in shown
    assert "--out " not in shown and "--out," not in shown and "--crop-px" not in shown
    predict = main.get_command(context, "predict")
    run, store = tmp_path / "run", tmp_path / "s.zarr"
    run.mkdir(), store.mkdir()
    assert str(predict.make_context("predict", [str(run), str(store), "--out", "p.csv"]).params["out_csv"]) == "p.csv"
    missing = CliRunner().invoke(main, ["predict", str(run), str(store)])
    assert missing.exit_code == 2 and "Missing option '-o' / '--output'." in missing.output


def _device_invocations(tmp_path: Path) -> dict[str, list[str]]:
    """Each command that takes --device, with its required arguments (files that exist)."""
    table, patches, run, store = tmp_path / "t.csv", tmp_path / "p.npz", tmp_path / "run", tmp_path / "s.zarr"
    table.write_text("store,label\n")
    patches.write_bytes(b"")
    run.mkdir(exist_ok=True), store.mkdir(exist_ok=True)
    return {"train": ["train", str(table), "-o", str(tmp_path / "r")],
            "predict": ["predict", str(run), str(store), "-o", str(tmp_path / "p.csv")],
            "probe": ["probe", "mean-rgb", str(patches), "-o", str(tmp_path / "p.json")],
            "train-encoder": ["train-encoder", "vae", str(patches), "-o", str(tmp_path / "e.pt")]}


@pytest.mark.parametrize("command", ["train", "predict", "probe", "train-encoder"])
def test_device_is_checked_the_same_way_everywhere(command: str, tmp_path: Path) -> None:
    args = _device_invocations(tmp_path)[command]
    assert "--device cpu|cuda|cuda:N" in CliRunner().invoke(main, [command, "--help"]).output
    malformed = CliRunner().invoke(main, [*args, "--device", "gpu"])
    assert malformed.exit_code == 2, malformed.output
    assert "Invalid value for '--device': device 'gpu' is not one of cpu|cuda|cuda:N" in malformed.output
    import torch

    if not torch.cuda.is_available():
        absent = CliRunner().invoke(main, [*args, "--device", "cuda:1"])
        assert absent.exit_code == 2 and "PyTorch sees no CUDA device here" in absent.output
    context = main.get_command(click.Context(main), command).make_context(command, [*args[1:], "--device", "CPU"])
    assert context.params["device"] == "cpu"


def test_check_device_against_the_devices_there_are(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert check_device(" cpu ") == "cpu"
    for bad in ("cpu:0", "cuda:", "cuda:-1", "mps", "cuda0", ""):
        with pytest.raises(DeviceError, match="is not one of cpu|cuda|cuda:N"):
            check_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert (check_device("cuda"), check_device("cuda:01"), check_device(torch.device("cuda", 1))) == \
        ("cuda", "cuda:1", "cuda:1")
    with pytest.raises(DeviceError, match=r"has 2 CUDA device\(s\), cuda:0..cuda:1"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="PyTorch sees no CUDA device here"):
        check_device("cuda")


def test_compress_runs_without_the_optional_packages(tmp_path: Path) -> None:
    """`python -m nic_fast compress` with kornia, matplotlib, DALI, cuCIM and h5py made unimportable
    in every process it starts (a sitecustomize, which the worker processes run too)."""
    slide = write_synthetic_slide(tmp_path / "slide.tif", height=3 * 128, width=4 * 128, seed=2, lesion=False).path
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        for name in {OPTIONAL_PACKAGES!r}:
            sys.modules[name] = None  # `import name` now raises ImportError, as if it were not installed
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def python(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)

    for name in ("kornia", "matplotlib.figure", "nvidia.dali", "cucim", "h5py"):
        blocked = python("-c", f"import {name}")
        assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr, name
    result = python("-m", "nic_fast", "compress", str(slide), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    store = nic_fast.open_store(tmp_path / "out" / "slide.zarr")
    assert store.grid_shape == (3, 4) and store.tissue.any()
    assert store.attrs["source"]["reader"] == "openslide"  # cuCIM was blocked where the slide was read, too
