"""The build switch of setup.py (CNNFAST_BUILD_CUDA) and what the installed extension reports."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup_module():
    spec = importlib.util.spec_from_file_location("cnnfast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_cuda_0_installs_pure_python(setup_module, monkeypatch):
    monkeypatch.setenv("CNNFAST_BUILD_CUDA", "0")
    assert setup_module.cuda_extensions() == []


def test_build_cuda_1_fails_loudly_without_nvcc(setup_module, monkeypatch):
    monkeypatch.setenv("CNNFAST_BUILD_CUDA", "1")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SystemExit, match="not found: nvcc"):
        setup_module.cuda_extensions()


def test_build_cuda_auto_skips_without_nvcc(setup_module, monkeypatch, capsys):
    monkeypatch.setenv("CNNFAST_BUILD_CUDA", "auto")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert setup_module.cuda_extensions() == []
    assert "installing without it" in capsys.readouterr().err


def test_build_cuda_rejects_unknown_mode(setup_module, monkeypatch):
    monkeypatch.setenv("CNNFAST_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="must be auto, 1 or 0"):
        setup_module.cuda_extensions()


@pytest.mark.skipif(not Path("/usr/local/cuda/bin/nvcc").exists(), reason="needs nvcc at install time")
def test_extension_built_for_hopper():
    from cnnfast.backends import cuda_extension

    assert "90a" in cuda_extension().build_info()["architectures"]
