"""The measured policy kept from one process to the next (llama/runtime/stored.py): read back instead
of measured again, measured again on request or when the kept file is unreadable, kept apart per
thread count; and never in the user's own cache directory while the tests run."""
import logging
import os
import tempfile

import pytest
import torch

from llama import launch
from llama.runtime import probes, quant_choice, stored
from test_runtime import NO_NATIVE_BF16


@pytest.fixture
def counted(monkeypatch):
    """probes.measure faked to NO_NATIVE_BF16, counting its calls; a fresh process each time the
    in-process cache is cleared (restart)."""
    calls = []
    monkeypatch.setattr(probes, "measure", lambda from_memory=True, cached=None: calls.append(1) or NO_NATIVE_BF16)
    probes._measured_cpu_policy.cache_clear()
    yield calls
    probes._measured_cpu_policy.cache_clear()


def restart_and_build() -> object:
    probes._measured_cpu_policy.cache_clear()
    return probes.policy_for(torch.device("cpu"))


def test_tests_never_write_the_users_cache():
    root = stored.cache_root()
    assert str(root).startswith(tempfile.gettempdir()) or "pytest" in str(root)
    assert root != __import__("pathlib").Path(os.path.expanduser("~/.cache/llama3-ref"))


def test_a_restart_reads_the_kept_policy_instead_of_measuring(counted):
    first = restart_and_build()
    second = restart_and_build()
    assert len(counted) == 1  # measured once, read back after the "restart"
    same = lambda p: (p.weights, p.decode, p.small, p.prefill)
    assert same(first) == same(second) and second.timings == first.timings
    assert "as kept in" in second.reason and str(stored.cache_root()) in second.reason
    kept = list((stored.cache_root() / "policy").glob("dtype-policy-*/policy.json"))
    assert len(kept) == 1


def test_a_model_in_the_cache_reads_its_kept_policy_too(counted):
    """The key of a model that fits in the cache holds its shape (a tuple, a list once kept as JSON):
    a restart still finds it, rather than measuring again at every start."""
    for _ in range(2):
        probes._measured_cpu_policy.cache_clear()
        policy = probes.policy_for(torch.device("cpu"), weight_bytes=2**20, shape=(896, 320))
    assert len(counted) == 1 and "as kept in" in policy.reason


def test_remeasure_measures_again(counted, monkeypatch):
    restart_and_build()
    stored.request_remeasure()  # --remeasure
    assert "as kept in" not in restart_and_build().reason
    monkeypatch.setattr(stored, "_remeasure", [False])
    monkeypatch.setenv(stored.REMEASURE_ENV, "1")
    restart_and_build()
    assert len(counted) == 3
    monkeypatch.delenv(stored.REMEASURE_ENV)
    restart_and_build()
    assert len(counted) == 3  # what the last measurement kept


def test_a_corrupt_kept_file_is_measured_again_with_one_warning(counted, caplog):
    restart_and_build()
    (path,) = (stored.cache_root() / "policy").glob("dtype-policy-*/policy.json")
    path.write_text('{"key": {"what"')
    with caplog.at_level(logging.WARNING, logger="llama.runtime"):
        policy = restart_and_build()
    assert len(counted) == 2 and policy.weights == torch.bfloat16
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreadable" in warnings[0] and "measuring again" in warnings[0]
    restart_and_build()
    assert len(counted) == 2  # rewritten whole


def test_another_thread_count_is_another_key(counted):
    probes._measured_cpu_policy(1)
    probes._measured_cpu_policy(2)
    assert len(counted) == 2
    assert stored.path_for("dtype-policy", {"threads": 1}) != stored.path_for("dtype-policy", {"threads": 2})
    assert len(list((stored.cache_root() / "policy").glob("dtype-policy-*"))) == 2


def test_the_quantized_kernels_are_kept_too(monkeypatch):
    calls = []
    fake = {(m, s, p, dt): (1e-3 if p == "dequant" else 2e-3)
            for m in quant_choice.QUANT_MODES for s in quant_choice.QUANT_STEPS
            for p in quant_choice.QUANT_PATHS for dt in ("bfloat16", "float32")}
    monkeypatch.setattr(quant_choice, "measure_quantized", lambda: calls.append(1) or fake)
    for _ in range(2):
        quant_choice._measured_quantized_policy.cache_clear()
        assert quant_choice.quantized_kernel("int8", "decode")[0] == "dequant"
    quant_choice._measured_quantized_policy.cache_clear()
    assert len(calls) == 1


def test_the_command_lines_remeasure_flag_reaches_the_policy(monkeypatch):
    monkeypatch.setattr(launch.Llama, "build", staticmethod(lambda **kw: kw))
    launch.build_generator(None, None, dtype="float32")
    assert not stored.remeasure_requested()
    launch.build_generator(None, None, remeasure=True, dtype="float32")
    assert stored.remeasure_requested()
