import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers  # noqa: E402

from llama.runtime import native, quant_choice, stored  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory) -> Path:
    return helpers.write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A one-shard random checkpoint of helpers.TINY_PARAMS (grouped-query: 4 heads, 2 KV heads)."""
    return helpers.make_checkpoint(tmp_path_factory.mktemp("tiny1"))


@pytest.fixture(scope="session")
def tiny_ckpt_2shards(tmp_path_factory) -> Path:
    """The same weights as tiny_ckpt, split into two shards."""
    return helpers.make_checkpoint(tmp_path_factory.mktemp("tiny2"), n_shards=2)


_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="llama-tests-cache-"))


def pytest_configure(config):
    # before collection: a test module that builds the native kernels on import builds them here,
    # never in the user's cache (the fixture below then gives each test a directory of its own)
    os.environ["XDG_CACHE_HOME"] = str(_SESSION_CACHE / "session")
    os.environ[native.KERNELS_DIR_ENV] = str(_SESSION_CACHE / "kernels")
    # quantized models keep float activations in the suite (tests compare their tokens and products
    # with the dequantized weights'); tests/test_native_kernels.py lifts it for the int8-activation kernels
    os.environ[quant_choice.WEIGHT_ONLY_ENV] = "1"


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def _measurement_caches() -> Path:
    return _SESSION_CACHE


@pytest.fixture(autouse=True)
def _own_measurement_cache(monkeypatch, request, _measurement_caches):
    """Every test (and the processes it starts) keeps what it measures (llama.runtime.stored) in a
    cache directory of its own: never the user's, never one holding another test's faked timings.
    (Created only when something is written there.)"""
    name = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    monkeypatch.setenv("XDG_CACHE_HOME", str(_measurement_caches / name))
    monkeypatch.delenv(stored.REMEASURE_ENV, raising=False)
    monkeypatch.setattr(stored, "_remeasure", [False])
    # the native kernels are built once per session, into a directory every test and process shares
    monkeypatch.setenv(native.KERNELS_DIR_ENV, str(_measurement_caches / "kernels"))
