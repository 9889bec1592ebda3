"""The package installs and imports both as an editable install (the dev venv) and as a plain wheel."""

import importlib
import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pcrlv2_fast

ROOT = Path(__file__).resolve().parents[1]


def all_modules(package) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


def test_editable_install_imports_everything():
    import pcrlv2_fast.kernels as kernels

    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
    names = all_modules(pcrlv2_fast)
    # (the editable finder maps pcrlv2_fast.kernels outside the package folder, so walk_packages skips it)
    assert {"pcrlv2_fast.models.unet3d", "pcrlv2_fast.train.loop", "pcrlv2_fast.data.dataset"} <= set(names)
    for name in names:
        if name != "pcrlv2_fast.__main__":
            importlib.import_module(name)


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_plain_wheel_installs_and_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("pcrlv2_fast-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        files = set(zf.namelist())
        entry_points = next(n for n in files if n.endswith("entry_points.txt"))
        assert "pcrlv2-fast = pcrlv2_fast.cli:main" in zf.read(entry_points).decode()
    assert {"pcrlv2_fast/kernels/__init__.py", "pcrlv2_fast/models/unet3d.py", "pcrlv2_fast/cli.py"} <= files
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in files)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    code = ("import pkgutil, importlib, pcrlv2_fast, pcrlv2_fast.kernels; "
            f"assert pcrlv2_fast.__file__.startswith({str(site)!r}), pcrlv2_fast.__file__; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(pcrlv2_fast.__path__, 'pcrlv2_fast.') "
            "if m.name != 'pcrlv2_fast.__main__']; print('ok')")
    # Run from an empty folder with only the installed copy on the path, so the source tree cannot leak in.
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_console_script_runs():
    exe = Path(sys.executable).parent / "pcrlv2-fast"
    if not exe.exists():
        pytest.skip(f"console script not installed beside {sys.executable} (run `make install`)")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and pcrlv2_fast.__version__ in out.stdout
    out = subprocess.run([sys.executable, "-m", "pcrlv2_fast", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout
