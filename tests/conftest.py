import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers  # noqa: E402


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
