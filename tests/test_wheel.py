"""minisd installed as a wheel works outside the checkout: the package data ships inside it.

Builds the wheel from this checkout (no build isolation: nothing is downloaded), installs it
into a fresh virtual environment whose only other packages are this environment's
dependencies (a .pth file points at them; this checkout's editable install is not among
them), and from an empty folder runs what a user runs first.
"""

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_WHEEL_BYTES = 20 * 2**20

USER_CODE = """
from pathlib import Path
import minisd
from minisd import CLIPTokenizer, StableDiffusionPipeline
from minisd.images import load_image
from minisd.package_data import bundled_model
assert "site-packages" in minisd.__file__, minisd.__file__
ids = CLIPTokenizer.openai()("a photo of a cat")[0, :7].tolist()
assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
assert "site-packages" in str(bundled_model()), bundled_model()
pipe = StableDiffusionPipeline.from_pretrained()
picture = pipe("a red circle", num_inference_steps=2, seed=0, progress=False).images[0]
assert picture.size == (64, 64)
assert tuple(load_image("cat", size=32).shape) == (3, 32, 32)
print("ok")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with the wheel installed, the wheel's path)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy: building writes build/ and egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("minisd", "data"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(work / "dist"), str(source)],
        capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (work / "dist").glob("minisd-*.whl")
    venv.create(work / "env", with_pip=True)
    python = work / "env" / "bin" / "python"
    env_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, numpy, pillow, …) of this environment, not its minisd
    Path(env_site, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index",
                              str(wheel)], capture_output=True, text=True, timeout=300,
                             check=False)
    assert install.returncode == 0, install.stderr[-2000:]
    return python, wheel


def test_wheel_is_small_and_carries_the_package_data(installed):
    _, wheel = installed
    assert wheel.stat().st_size < MAX_WHEEL_BYTES
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)],
                           capture_output=True, text=True, check=True).stdout
    for needed in ("minisd/data/bpe_simple_vocab_16e6.txt.gz", "minisd/data/cat.jpg",
                   "minisd/data/minisd-shapes/model_index.json",
                   "minisd/data/minisd-shapes/unet/diffusion_pytorch_model.safetensors",
                   "minisd/data/course/unet-small-2000steps/unet/diffusion_pytorch_model.safetensors",
                   "minisd/shapes/world.py", "minisd/training/loop.py"):
        assert needed in names, needed


def test_installed_wheel_works_outside_the_checkout(installed, tmp_path):
    python, _ = installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    run = subprocess.run([python, "-c", USER_CODE], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
    cli = subprocess.run([python, "-m", "minisd", "a blue square", "-o", "x.png", "--seed", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert (tmp_path / "x.png").stat().st_size > 0
