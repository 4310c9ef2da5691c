"""Checkpoint loading: any shard count on any process count that divides (or is divided by) it, in
real processes and across two simulated nodes; tied embeddings; lean construction; one-line errors."""
import concurrent.futures
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fairscale.nn.model_parallel.layers as fs_layers
import pytest
import torch

import helpers
from llama import distributed
from llama.weights import checkpoint, loader, rank_state, save
from llama.model import ModelArgs, Transformer

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
from ckpt_load import PROMPT, greedy  # noqa: E402  (the worker's own decode loop, run here as the reference)

WORKER = "tests/workers/ckpt_load.py"
PARAMS = helpers.TINY_PARAMS  # 4 heads, 2 KV heads: 4 processes repeat each KV head twice
SHARD_COUNTS = (1, 2, 4)


def model_args(params: dict = PARAMS) -> ModelArgs:
    return ModelArgs(**params, max_seq_len=32, max_batch_size=1)


@pytest.fixture(scope="module")
def full_sd() -> dict:
    return helpers.random_state_dict(PARAMS, seed=3)


def tied_sd(full_sd: dict) -> dict:
    """A tied model (no output.weight); the output matrix serves as both, keeping logits moderate."""
    return {**{k: v for k, v in full_sd.items() if k != "output.weight"}, "tok_embeddings.weight": full_sd["output.weight"]}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, full_sd) -> dict:
    """The same weights as 1, 2 and 4 shards, and as a tied 2-shard checkpoint without output.weight."""
    root = tmp_path_factory.mktemp("ckpts")
    dirs = {}
    for n in SHARD_COUNTS:
        save.save_checkpoint(full_sd, PARAMS, root / f"n{n}", n_shards=n)
        dirs[n] = root / f"n{n}"
    save.save_checkpoint(tied_sd(full_sd), PARAMS, root / "tied2", n_shards=2)
    dirs["tied2"] = root / "tied2"
    return dirs


@pytest.fixture(scope="module")
def cpu_group():
    distributed.setup(torch.device("cpu"))


def reference(state_dict: dict) -> tuple[torch.Tensor, list]:
    """The unsharded model built the plain way (no checkpoint code) and the worker's decode loop."""
    model = Transformer(model_args())
    model.load_state_dict(state_dict, strict=True)
    return greedy(model.eval(), PROMPT)


@pytest.fixture(scope="module")
def references(cpu_group, full_sd) -> dict:
    tied = tied_sd(full_sd)
    return {"untied": reference(full_sd), "tied": reference({**tied, "output.weight": tied["tok_embeddings.weight"]})}


def expected_slice(key: str, full: torch.Tensor, rank: int, count: int) -> torch.Tensor:
    """The sharding rules written out independently of llama.weights."""
    module = key.split(".")[-2]
    head_dim, n_kv = PARAMS["dim"] // PARAMS["n_heads"], PARAMS["n_kv_heads"]
    if module in ("wk", "wv") and count > n_kv:
        h = rank // (count // n_kv)  # each rank holds one whole, repeated, KV head
        return full[h * head_dim : (h + 1) * head_dim]
    if module in ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings"):
        return full.chunk(count, dim=0)[rank]
    if module in ("wo", "w2"):
        return full.chunk(count, dim=1)[rank]
    return full  # norms


# ---------------------------------------------------------------------------------------------
# Slicing and loading in this process


@pytest.mark.parametrize("n_shards", SHARD_COUNTS)
@pytest.mark.parametrize("count", SHARD_COUNTS)
def test_each_rank_assembles_exactly_its_slice(ckpts, full_sd, n_shards, count):
    for rank in range(count):
        state = rank_state.load_rank_state(ckpts[n_shards], model_args(), rank, count)
        assert set(state) == set(full_sd)
        for key, t in state.items():
            assert torch.equal(t, expected_slice(key, full_sd[key], rank, count)), (key, rank)


def test_source_shards_are_read_one_at_a_time_and_only_those_needed(ckpts, monkeypatch):
    opened, live = [], []
    real = rank_state._MappedShard.__init__

    def spy(self, path):
        real(self, path)
        opened.append(path.name)

    monkeypatch.setattr(rank_state._MappedShard, "__init__", spy)
    monkeypatch.setattr(rank_state._MappedShard, "__del__", lambda self: live.append(self.path.name), raising=False)
    rank_state.load_rank_state(ckpts[4], model_args(), 1, 2)
    assert opened == ["consolidated.02.pth", "consolidated.03.pth"]
    assert live == opened  # each mapped shard was dropped before the next was opened (CPython refcounting)
    opened.clear()
    rank_state.load_rank_state(ckpts[1], model_args(), 3, 4)
    assert opened == ["consolidated.00.pth"]


def test_save_checkpoint_repeats_whole_kv_heads_past_n_kv_heads(ckpts, full_sd):
    head_dim = PARAMS["dim"] // PARAMS["n_heads"]
    for k, path in enumerate(checkpoint.shard_paths(ckpts[4])):
        shard = checkpoint.load_shard(path)
        key = "layers.0.attention.wk.weight"
        assert torch.equal(shard[key], full_sd[key][k // 2 * head_dim : (k // 2 + 1) * head_dim])


@pytest.mark.parametrize("n_shards", SHARD_COUNTS)
def test_one_process_loads_every_shard_count(cpu_group, ckpts, full_sd, references, n_shards):
    model = loader.load_model(ckpts[n_shards], model_args(), 0, 1, torch.device("cpu"), torch.float32)
    for key, t in model.state_dict().items():
        assert torch.equal(t, full_sd[key]), key
    logits, tokens = greedy(model, PROMPT)
    assert tokens == references["untied"][1]
    torch.testing.assert_close(logits, references["untied"][0], atol=1e-5, rtol=0)


def test_construction_builds_no_master_weights_and_leaves_nothing_on_meta(cpu_group, ckpts, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("fairscale built a full-size master weight")

    monkeypatch.setattr(fs_layers, "_initialize_affine_weight", forbidden)
    model = loader.load_model(ckpts[2], model_args(), 0, 1, torch.device("cpu"), torch.bfloat16)
    assert fs_layers._initialize_affine_weight is forbidden  # restored after construction
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_loads_every_shard_count(cpu_group, ckpts, full_sd, references, dtype):
    for n_shards in SHARD_COUNTS:
        model = loader.load_model(ckpts[n_shards], model_args(), 0, 1, torch.device("cuda"), dtype)
        for key, t in model.state_dict().items():
            assert t.is_cuda and t.dtype == dtype and torch.equal(t.cpu(), full_sd[key].to(dtype)), key
        if dtype == torch.float32:
            logits, tokens = greedy(model, PROMPT)
            assert tokens == references["untied"][1]
            torch.testing.assert_close(logits, references["untied"][0], atol=1e-4, rtol=0)
    tied = loader.load_model(ckpts["tied2"], model_args(), 0, 1, torch.device("cuda"), dtype)
    assert tied.output.weight is tied.tok_embeddings.weight and tied.output.weight.is_cuda


def test_tied_checkpoint_shares_one_tensor(cpu_group, ckpts, references):
    model = loader.load_model(ckpts["tied2"], model_args(), 0, 1, torch.device("cpu"), torch.float32)
    assert model.output.weight is model.tok_embeddings.weight
    logits, tokens = greedy(model, PROMPT)
    assert tokens == references["tied"][1]
    torch.testing.assert_close(logits, references["tied"][0], atol=1e-5, rtol=0)


def test_rope_freqs_is_ignored(cpu_group, tmp_path, full_sd):
    save.save_checkpoint({**full_sd, "rope.freqs": torch.ones(8)}, PARAMS, tmp_path, n_shards=2)
    model = loader.load_model(tmp_path, model_args(), 0, 1, torch.device("cpu"), torch.float32)
    assert torch.equal(model.norm.weight, full_sd["norm.weight"])


def test_progress_and_load_time_are_logged_on_rank0(cpu_group, ckpts, caplog):
    with caplog.at_level(logging.INFO, logger="llama.weights"):
        loader.load_model(ckpts[4], model_args(), 0, 1, torch.device("cpu"), torch.float32)
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0] for m in messages[:4]] == [f"loading consolidated.0{k}.pth" for k in range(4)]
    assert "(shard 4 of 4 in the checkpoint, " in messages[3] and "; 4 of 4 this process reads)" in messages[3]
    assert messages[-1].startswith(f"loaded {ckpts[4]} (4 shard(s)) on 1 process(es) in ")


def test_large_loads_log_each_quarter(cpu_group, ckpts, caplog, monkeypatch):
    monkeypatch.setattr(rank_state, "PROGRESS_MIN_BYTES", 0)  # the test checkpoint is small
    with caplog.at_level(logging.INFO, logger="llama.weights"):
        loader.load_model(ckpts[2], model_args(), 0, 1, torch.device("cpu"), torch.float32)
    quarters = [r.getMessage() for r in caplog.records if "of this process's weights" in r.getMessage()]
    percents = [int(m.split("%")[0]) for m in quarters]
    assert percents == sorted(percents) and percents[-1] == 100 and len(percents) <= 4, quarters
    assert len(percents) >= 2  # several lines, not one at the end
    total = sum(t.numel() * 4 for t in rank_state.load_rank_state(ckpts[2], model_args(), 0, 1).values())
    assert f"of {total / 1e9:.2f} GB" in quarters[-1]


# ---------------------------------------------------------------------------------------------
# Real processes (gloo): every shard count on 1, 2 and 4 processes, and two simulated nodes


def check_results(results: dict, ckpts: dict, references: dict, mp_size: int) -> None:
    for name, ckpt in ckpts.items():
        got = results[str(ckpt)]
        logits, tokens = references["tied" if name == "tied2" else "untied"]
        assert got["mp_size"] == mp_size
        assert got["tokens"] == tokens, name
        torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=0, msg=f"checkpoint {name}")


def multi_node_command(node_rank: int, port: int, script_args: list) -> list:
    """One node of a two-node torchrun launch (both nodes on this machine, c10d rendezvous)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "ckpt-test",
        "--local_addr", "127.0.0.1",  # this machine may have no resolvable host name
        WORKER, *map(str, script_args),
    ]


def two_nodes(out: Path, ckpt_dirs: str) -> list:
    """Both nodes of a two-node launch of the worker: their exit codes and output."""
    port = helpers.free_port()
    pythonpath = os.pathsep.join(p for p in (str(helpers.REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    args = ["--ckpt_dirs", ckpt_dirs, "--out", out]
    nodes = [
        subprocess.Popen(multi_node_command(rank, port, args), cwd=helpers.REPO, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=180)[0] for node in nodes]
    return [(node.returncode, log) for node, log in zip(nodes, logs)]


@pytest.fixture(scope="module")
def launches(tmp_path_factory, ckpts):
    """The worker's real multi-process runs, started side by side when the first test asks (each
    test below waits for its own): every checkpoint on 2 and on 4 processes (one launch per process
    count: fairscale fixes the model-parallel size per group; 4 processes on a model of 2 KV heads
    repeat each head on two ranks), and the 2-shard checkpoints across two nodes. One process
    loading every shard count and the tied checkpoint is this process's own case
    (test_one_process_loads_every_shard_count, test_tied_checkpoint_shares_one_tensor): no launch."""
    root = tmp_path_factory.mktemp("launches")
    dirs = ",".join(str(d) for d in ckpts.values())
    pool = concurrent.futures.ThreadPoolExecutor(3)
    jobs = {nproc: pool.submit(helpers.run_torchrun, WORKER, ["--ckpt_dirs", dirs, "--out", root / f"out{nproc}.pt"], nproc,
                               timeout=180) for nproc in (2, 4)}
    jobs["nodes"] = pool.submit(two_nodes, root / "nodes.pt", f"{ckpts[2]},{ckpts['tied2']}")
    yield {name: (job, root / f"out{name}.pt" if name != "nodes" else root / "nodes.pt") for name, job in jobs.items()}
    pool.shutdown(wait=True)


@pytest.mark.parametrize("nproc", [n for n in SHARD_COUNTS if n > 1])
def test_processes_match_the_unsharded_model_for_every_shard_count(launches, ckpts, references, nproc):
    job, out = launches[nproc]
    r = job.result()
    assert r.returncode == 0, r.stderr[-3000:]
    check_results(torch.load(out), ckpts, references, nproc)


def test_two_nodes_match_one_process(launches, ckpts, references):
    job, out = launches["nodes"]
    nodes = job.result()
    assert [rc for rc, _ in nodes] == [0, 0], "\n".join(log[-2000:] for _, log in nodes)
    check_results(torch.load(out), {2: ckpts[2], "tied2": ckpts["tied2"]}, references, 2)


# ---------------------------------------------------------------------------------------------
# One-line errors


def load(ckpt_dir, mp_size: int = 1, params: dict = PARAMS):
    return loader.load_model(ckpt_dir, model_args(params), 0, mp_size, torch.device("cpu"), torch.float32)


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_empty_or_corrupt_shards_are_named(cpu_group, tmp_path, ckpts):
    bad = copy_ckpt(ckpts[2], tmp_path / "bad")
    shard = bad / "consolidated.01.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth is truncated or corrupt .*download or copy it again"):
        load(bad)
    shard.write_bytes(b"\x80not a checkpoint" * 64)
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth is not a PyTorch zip checkpoint"):
        load(bad)
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth is empty"):
        load(bad)


def test_shards_that_disagree_are_named(cpu_group, tmp_path, ckpts, full_sd):
    # shard 1 taken from a 4-shard checkpoint of the same model: its pieces are half the size
    mixed = copy_ckpt(ckpts[2], tmp_path / "mixed")
    shutil.copy(ckpts[4] / "consolidated.01.pth", mixed / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"tok_embeddings\.weight has shape \(128, 64\) in consolidated\.01\.pth "
                                         r"but \(256, 64\) in consolidated\.00\.pth: the shards of .* do not belong"):
        load(mixed)


def test_params_that_do_not_match_the_weights_name_the_first_key_and_both_shapes(cpu_group, tmp_path, ckpts):
    other = copy_ckpt(ckpts[2], tmp_path / "other")
    params = {**PARAMS, "n_kv_heads": 4}
    (other / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"params.json does not match the weights: layers\.0\.attention\.wk\.weight "
                                         r"is \(16, 64\) in consolidated\.00\.pth but params.json implies \(32, 64\) for 2 shard"):
        load(other, params=params)


def test_missing_and_unexpected_keys_are_named(cpu_group, tmp_path, full_sd):
    sd = {k: v for k, v in full_sd.items() if k != "layers.1.ffn_norm.weight"}
    save.save_checkpoint({**sd, "lm_head.weight": full_sd["output.weight"]}, PARAMS, tmp_path)
    with pytest.raises(ValueError, match=r"missing keys \['layers\.1\.ffn_norm\.weight'\], "
                                         r"unexpected keys \['lm_head\.weight'\]"):
        load(tmp_path)


def test_a_process_count_that_fits_neither_way_says_what_fits(ckpts):
    with pytest.raises(ValueError, match=r"has 4 shard\(s\) and 3 model-parallel processes were started, and "
                                         r"neither count divides the other: use one of \[1, 2, 4\] processes"):
        load(ckpts[4], mp_size=3)


def test_more_processes_than_heads_is_refused(ckpts):
    with pytest.raises(ValueError, match=r"8 model-parallel processes but the model has only 4 attention heads: "
                                         r"use at most 4 processes"):
        load(ckpts[1], mp_size=8)


def test_a_process_group_of_another_size_is_refused(cpu_group, ckpts):
    with pytest.raises(ValueError, match=r"asked for 2 model-parallel rank\(s\) but fairscale's model-parallel size is 1"):
        load(ckpts[2], mp_size=2)


def test_errors_are_one_line(cpu_group, tmp_path, ckpts):
    bad = copy_ckpt(ckpts[1], tmp_path / "bad")
    (bad / "consolidated.00.pth").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ValueError) as e:
        load(bad)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Memory: benchmarks/bench_load.py's measurement, on a small checkpoint


def test_loading_costs_the_weights_once_where_the_naive_way_costs_twice(tmp_path):
    def bench(shards: int) -> list:  # 149 MB in float32
        return [sys.executable, "benchmarks/bench_load.py", "--dim", "512", "--n_layers", "8", "--vocab_size", "8000",
                "--dtype", "float32", "--shards", str(shards), "--repeats", "1", "--out", str(tmp_path / f"load{shards}.json")]

    # each run measures its own process's memory: the two run side by side
    runs = helpers.run_at_once([bench(1), bench(2)], cwd=helpers.REPO, env=helpers.child_env(), capture_output=True,
                               text=True, timeout=600)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"load{shards}.json").read_text())["methods"] for shards in (1, 2))
    added = [one["lean"]["added_over_size"], two["lean"]["added_over_size"], one["naive"]["added_over_size"]]
    # lean: the weights plus at most one 16 MiB copy chunk (0.11x of this small model), merging or
    # not; naive: twice the weights
    assert added[0] < 1.3 and added[1] < 1.3, added
    assert added[2] > 1.8, added
    assert one["lean"]["checksum"] == two["lean"]["checksum"] == one["naive"]["checksum"]
