"""What a user's install carries: the kernel sources of the top-level cuda/ folder travel inside
the extension of every wheel (never as files under site-packages/cuda/, cuda-python's namespace)
and as files in the sdist, so that a wheel built from the sdist carries them too."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from ferroquant import _native

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "cuda"
LIBS = (".so", ".pyd", ".dylib")


def _kernel_files() -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(CUDA_DIR.iterdir()) if p.is_file()}
    assert files, f"no kernel sources in {CUDA_DIR}"
    return files


def test_extension_carries_every_kernel_source_byte_for_byte():
    embedded = {name: text.encode() for name, text in _native.cuda_sources()}
    assert embedded == _kernel_files()


def _maturin(*args: str, out: Path) -> Path:
    cmd = [sys.executable, "-m", "maturin", *args, "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if res.returncode:
        pytest.fail(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    (built,) = out.iterdir()
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # The same release profile as `pip install .`: cargo reuses that build when it is in target/.
    return _maturin("build", "--release", out=tmp_path_factory.mktemp("wheel"))


def test_wheel_lists_every_kernel_source_inside_the_extension(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert not [n for n in names if n.startswith("cuda/")], "files in cuda-python's namespace"
        (native,) = [n for n in names if n.startswith("ferroquant/_native.") and n.endswith(LIBS)]
        binary = z.read(native)
    for name, data in _kernel_files().items():
        assert data in binary, f"{name} is not inside {native} of {wheel.name}"


def test_sdist_carries_the_cuda_folder(tmp_path):
    sdist = _maturin("sdist", out=tmp_path)
    with tarfile.open(sdist) as t:
        members = {Path(m.name).relative_to(Path(m.name).parts[0]).as_posix(): m for m in t}
        for name, data in _kernel_files().items():
            m = members.get(f"cuda/{name}")
            assert m is not None, f"cuda/{name} missing from {sdist.name}"
            assert t.extractfile(m).read() == data
