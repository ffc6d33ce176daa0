"""What a non-editable install gets: the wheel carries the bundled recipes, addressable by name."""
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_the_wheel_in_a_fresh_virtualenv_lists_and_validates_recipes(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("lora_tune-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies (torch, transformers, ...) come from this environment; lora-tune only from the wheel.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    where = subprocess.run([python, "-c", "import lora_tuner; print(lora_tuner.__file__)"], capture_output=True,
                           text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(venv)), where  # not this checkout
    page = subprocess.run([python, "-c", "from lora_tuner.ui.app import STATIC; print(sorted(p.name for p in "
                           "STATIC.iterdir()))"], capture_output=True, text=True, cwd=tmp_path)
    assert page.stdout.strip() == "['app.js', 'index.html', 'style.css']", page.stderr[-2000:]  # `lora-tune ui`'s page

    listed = subprocess.run([venv / "bin" / "lora-tune", "recipes"], capture_output=True, text=True, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    checked = subprocess.run([venv / "bin" / "lora-tune", "validate", "demo-tiny-cpu"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert checked.returncode == 0 and "ok: demo-tiny-cpu" in checked.stdout, checked.stderr[-2000:]
