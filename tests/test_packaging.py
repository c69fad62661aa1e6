"""The wheel: cli/ ships as gradindex.cli (no top-level `cli`), and the console script runs outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (path,) = out.glob("gradindex-*.whl")
    return path


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradindex/cli/__init__.py" in names and "gradindex/cli/_main.py" in names
    assert not any(name.startswith("cli/") for name in names), [n for n in names if n.startswith("cli/")]
    assert not any(name.startswith("tests/") or name.startswith("benchmarks/") for name in names)
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "gradindex = gradindex.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _isolated_venv(env_dir: Path) -> Path:
    """A fresh venv that sees the dependencies this test runs with (torch, faiss, zarr: nothing is downloaded), but
    not this checkout: the site-packages folders of the running interpreter, wherever torch came from (a venv, the
    system), are lent through a .pth file of plain paths, so their own .pth files (an editable gradindex) are not
    run."""
    venv.EnvBuilder(system_site_packages=False, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    lent |= {entry for entry in sys.path if entry.endswith(("site-packages", "dist-packages"))}
    (Path(purelib) / "lent-by-the-test.pth").write_text(
        "".join(f"{entry}\n" for entry in sorted(lent) if Path(entry).is_dir())
    )
    return python


def test_installed_console_script_runs_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    python = _isolated_venv(env_dir)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import gradindex.cli, gradindex; print(gradindex.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    assert str(env_dir) in where.stdout, where.stdout
    helped = subprocess.run(
        [str(env_dir / "bin" / "gradindex"), "--help"], cwd=elsewhere, capture_output=True, text=True
    )
    assert helped.returncode == 0, helped.stderr
    assert "gradindex build" in helped.stdout and "Example:" in helped.stdout


def test_the_wheel_holds_every_package_of_the_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    folders = sorted(path.parent.relative_to(ROOT).as_posix() for path in (ROOT / "gradindex").rglob("__init__.py"))
    missing = [folder for folder in folders if f"{folder}/__init__.py" not in names]
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
