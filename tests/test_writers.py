"""Writers (convert both ways, reshard, quantize, llama/atomic.py) never lose or mix data: refusals leave the
destination's bytes unchanged, --overwrite replaces it whole, a SIGKILL at any step leaves it absent,
as it was, or complete; readers refuse inconsistent directories; checklist.chk is verified."""
import hashlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import helpers
from llama import Llama, atomic
from llama.weights import checklist, checkpoint, reshard

pytest.importorskip("safetensors")
from llama.weights import convert  # noqa: E402

sys.path.insert(0, str(helpers.REPO / "tests" / "workers"))

OTHER = {**helpers.TINY_PARAMS, "n_layers": 1}  # a different model, to tell old from new


def snapshot(path: Path) -> dict:
    """Every file under `path` -> sha256 of its bytes (None if path is absent)."""
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }


def contents(path: Path) -> dict:
    """What a written directory means: .pth shards as their tensors (torch.save's bytes differ from
    run to run), every other file as its bytes. None if absent."""
    if not path.exists():
        return None
    out = {}
    for p in sorted(path.rglob("*")):
        if p.suffix == ".pth":
            shard = checkpoint.load_shard(p)
            out[p.name] = {k: (v.dtype, tuple(v.shape), hashlib.sha256(v.contiguous().flatten().view(torch.uint8).numpy().tobytes()).hexdigest()) for k, v in shard.items()}
        elif p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    """A 2-shard Meta checkpoint with its tokenizer."""
    ckpt = helpers.make_checkpoint(tmp_path_factory.mktemp("meta") / "ckpt", n_shards=2)
    helpers.write_byte_tokenizer(ckpt / "tokenizer.model")
    return ckpt


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, meta) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    convert.to_hf(str(meta), str(out))
    return out


def test_from_hf_over_an_existing_checkpoint_is_refused_and_overwrite_replaces_it_whole(tmp_path, meta, hf_dir):
    dst = tmp_path / "dst"
    shutil.copytree(meta, dst)  # consolidated.00/01, params.json, tokenizer.model
    before = snapshot(dst)
    with pytest.raises(ValueError, match=r"already holds 4 file\(s\) \(consolidated.00.pth, .*pass --overwrite to replace it whole"):
        convert.from_hf(str(hf_dir), str(dst), shards=1)
    assert snapshot(dst) == before
    convert.from_hf(str(hf_dir), str(dst), shards=1, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    fresh = tmp_path / "fresh"
    convert.from_hf(str(hf_dir), str(fresh), shards=1)
    assert contents(dst) == contents(fresh)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_to_hf_over_a_sharded_conversion_leaves_no_stale_index(tmp_path, meta):
    dst = tmp_path / "hf"
    convert.to_hf(str(meta), str(dst), max_shard_size="40KB")
    assert (dst / "model.safetensors.index.json").is_file()
    small = helpers.make_checkpoint(tmp_path / "small", OTHER, seed=5)
    before = snapshot(dst)
    with pytest.raises(ValueError, match="already holds .*--overwrite"):
        convert.to_hf(str(small), str(dst))
    assert snapshot(dst) == before
    convert.to_hf(str(small), str(dst), overwrite=True)
    assert not (dst / "model.safetensors.index.json").exists()
    assert [p.name for p in dst.glob("*.safetensors")] == ["model.safetensors"]
    back = tmp_path / "back"
    convert.from_hf(str(dst), str(back))  # our reader sees the new weights, as transformers does
    want, got = checkpoint.load_shard(small / "consolidated.00.pth"), checkpoint.load_shard(back / "consolidated.00.pth")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_reshard_refuses_a_directory_holding_any_file(tmp_path, meta):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "params.json").write_text("{}")
    (dst / "tokenizer.model").write_text("mine")
    before = snapshot(dst)
    with pytest.raises(ValueError, match=r"already holds 2 file\(s\) \(params.json, tokenizer.model\)"):
        reshard.reshard(str(meta), str(dst), shards=1)
    assert snapshot(dst) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    reshard.reshard(str(meta), str(empty), shards=1)  # an empty directory is fine
    assert sorted(p.name for p in empty.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]


@pytest.mark.parametrize("where", ["same", "inside", "holds_input"])
def test_output_equal_to_inside_or_holding_the_input_is_refused(tmp_path, meta, hf_dir, where):
    src = tmp_path / "src"
    shutil.copytree(meta, src / "m")
    shutil.copytree(hf_dir, src / "h")
    before = snapshot(src)

    def dst(inp: Path) -> str:
        return str({"same": inp, "inside": inp / "out", "holds_input": src}[where])

    words = {"same": "is the input directory", "inside": "is inside the input", "holds_input": "is inside the output"}[where]
    for call in (
        lambda: convert.to_hf(str(src / "m"), dst(src / "m"), overwrite=True),
        lambda: convert.from_hf(str(src / "h"), dst(src / "h"), overwrite=True),
        lambda: reshard.reshard(str(src / "m"), dst(src / "m"), shards=1, overwrite=True),
    ):
        with pytest.raises(ValueError, match=words):
            call()
        assert snapshot(src) == before


def test_to_hf_files_get_ordinary_permissions(tmp_path, meta):
    old = os.umask(0o022)
    try:
        convert.to_hf(str(meta), str(tmp_path / "hf"))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755


def test_a_failed_verify_or_write_leaves_the_destination_as_it_was(tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("previous version")

    def bad(tmp: Path) -> None:
        raise ValueError("verify says no")

    with pytest.raises(ValueError, match="verify says no"):
        with atomic.atomic_output_dir(dst, overwrite=True, verify=bad) as tmp:
            (tmp / "new").write_text("new")
    with pytest.raises(RuntimeError):
        with atomic.atomic_output_dir(dst, overwrite=True) as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("the writer fails midway")
    assert snapshot(dst) == {"keep": hashlib.sha256(b"previous version").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a system without renameat2
    with atomic.atomic_output_dir(dst, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"] and sorted(os.listdir(dst)) == ["new"]


def test_a_file_in_place_of_the_output_directory_is_refused(tmp_path, meta):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        reshard.reshard(str(meta), str(tmp_path / "out"), shards=1, overwrite=True)
    assert (tmp_path / "out").read_text() == "x"


def test_cli_refusal_is_one_line_and_overwrite_is_a_flag(tmp_path, meta):
    dst = tmp_path / "dst"
    shutil.copytree(meta, dst)
    cmd = [sys.executable, str(helpers.REPO / "scripts" / "convert.py"), "to_hf", str(meta), str(dst)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=helpers.child_env(), timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: output ")
    assert "--overwrite" in r.stderr and snapshot(dst) == snapshot(meta)
    r = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=helpers.child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert (dst / "config.json").is_file() and not list(dst.glob("*.pth"))


# ---------------------------------------------------------------------------------------------
# Readers refuse inconsistent directories


def test_an_index_naming_missing_files_or_files_it_does_not_name_is_refused(tmp_path, meta):
    hf = tmp_path / "hf"
    convert.to_hf(str(meta), str(hf), max_shard_size="40KB")
    files = sorted(p.name for p in hf.glob("*.safetensors"))
    assert len(files) >= 2
    stray = tmp_path / "stray"
    shutil.copytree(hf, stray)
    shutil.copy(stray / files[0], stray / "model.safetensors")  # a single-file conversion's leftover
    with pytest.raises(ValueError, match=r"\['model.safetensors'\] are not named in model.safetensors.index.json"):
        convert.from_hf(str(stray), str(tmp_path / "out1"))
    gone = tmp_path / "gone"
    shutil.copytree(hf, gone)
    (gone / files[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"{files[1]}.*named in the index are missing"):
        convert.from_hf(str(gone), str(tmp_path / "out2"))
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_shard_numbering_with_gaps_or_stray_pth_files_is_refused(tmp_path):
    ckpt = helpers.make_checkpoint(tmp_path / "c", n_shards=4)
    (ckpt / "consolidated.02.pth").unlink()
    with pytest.raises(ValueError, match=r"up to consolidated.03.pth but \['consolidated.02.pth'\] is missing"):
        checkpoint.shard_paths(ckpt)
    other = helpers.make_checkpoint(tmp_path / "d", n_shards=1)
    (other / "model.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds \['model.pth'\] beside its consolidated.NN.pth shards"):
        checkpoint.shard_paths(other)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo this must not run",))


def test_a_pickle_holding_code_is_refused_for_safety_not_called_corrupt(tmp_path):
    path = tmp_path / "consolidated.00.pth"
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": Payload()}, path)
    with pytest.raises(ValueError, match=r"holds Python objects other than tensors \(posix.system: .*refused for safety") as e:
        checkpoint.load_shard(path)
    assert "truncated" not in str(e.value) and "corrupt" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# checklist.chk


def write_checklist(ckpt: Path) -> None:
    names = sorted(p.name for p in ckpt.iterdir() if p.is_file())
    lines = [f"{hashlib.md5((ckpt / n).read_bytes()).hexdigest()}  {n}" for n in names]
    (ckpt / "checklist.chk").write_text("\n".join(lines) + "\n")


def test_checklist_names_each_damaged_or_missing_file(tmp_path, meta, byte_tokenizer):
    ckpt = tmp_path / "c"
    shutil.copytree(meta, ckpt)
    write_checklist(ckpt)
    lines = []
    assert checklist.checklist_problems(ckpt, lines.append) == []
    assert len(lines) == 4 and lines[0].startswith("[1/4] consolidated.00.pth ok (")
    script = [sys.executable, str(helpers.REPO / "scripts" / "verify.py"), str(ckpt)]
    r = subprocess.run(script, capture_output=True, text=True, env=helpers.child_env(), timeout=120)
    assert r.returncode == 0 and "ok: all 4 file(s) match checklist.chk" in r.stdout, r.stderr

    data = bytearray((ckpt / "consolidated.01.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights: the zip still opens
    (ckpt / "consolidated.01.pth").write_bytes(bytes(data))
    (ckpt / "tokenizer.model").unlink()
    problems = checklist.checklist_problems(ckpt)
    assert len(problems) == 2
    assert problems[0].startswith("consolidated.01.pth: md5 ") and "but checklist.chk says" in problems[0]
    assert problems[1] == "tokenizer.model: missing (checklist.chk lists it)"
    r = subprocess.run(script, capture_output=True, text=True, env=helpers.child_env(), timeout=120)
    assert r.returncode == 1
    assert [x for x in r.stderr.splitlines() if x.startswith("bad: ")] == [f"bad: {p}" for p in problems]
    assert r.stderr.strip().splitlines()[-1].startswith("error: 2 of 4 file(s)")
    r = subprocess.run(script[:2] + ["--help"], capture_output=True, text=True, env=helpers.child_env(), timeout=120)
    assert r.returncode == 0 and "verify.py CKPT_DIR" in r.stdout + r.stderr
    with pytest.raises(ValueError, match=r"does not match its checklist.chk: consolidated.01.pth: md5"):
        Llama.build(str(ckpt), str(byte_tokenizer), 32, 1, device="cpu", dtype="float32", verify=True)


def test_verify_without_a_checklist_says_so(tmp_path, meta, byte_tokenizer):
    with pytest.raises(FileNotFoundError, match="checklist.chk is missing"):
        Llama.build(str(meta), str(byte_tokenizer), 32, 1, device="cpu", dtype="float32", verify=True)
    (tmp_path / "checklist.chk").write_text("not a line\n")
    with pytest.raises(ValueError, match="line 1 is not 'md5  filename'"):
        checklist.read_checklist(tmp_path)


# ---------------------------------------------------------------------------------------------
# SIGKILL at every kind of step: the destination is absent, as it was, or complete; the input intact

WRITERS = ["to_hf", "from_hf", "reshard", "quantize"]


@pytest.fixture(scope="module")
def forkserver():
    """Children forked from a server that imported torch and the writers once (a fresh interpreter
    per kill would cost seconds each on 2 cores; a fork of this test process could inherit OpenMP
    threads in a bad state)."""
    import multiprocessing.forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["kill_writer"])
    # the server imports its preload from PYTHONPATH (Python 3.11 does not pass it sys.path)
    workers = str(helpers.REPO / "tests" / "workers")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(helpers.REPO), workers, old) if p)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return ctx


def run_writer(ctx, kind, src, dst, overwrite, kill_at):
    """Run writer `kind` in a child; kill it with SIGKILL just before its step `kill_at`. Returns the
    number of steps of a full run (kill_at beyond the last) or None when it was killed."""
    import kill_writer

    parent, child = ctx.Pipe()
    p = ctx.Process(target=kill_writer.run_writer, args=(kind, str(src), str(dst), overwrite, kill_at, child))
    p.start()
    try:
        if not parent.poll(120):
            raise AssertionError(f"{kind} reported nothing within 120 s")
        msg = parent.recv()
        if isinstance(msg, tuple):
            p.join(60)
            assert p.exitcode == 0
            return msg[1]
        assert msg == kill_at
        os.kill(p.pid, signal.SIGKILL)
        p.join(60)
        assert p.exitcode == -signal.SIGKILL
        return None
    finally:
        if p.is_alive():
            p.kill()
            p.join()


@pytest.mark.parametrize("kind", WRITERS)
def test_sigkill_at_any_step_never_leaves_a_mix(tmp_path, meta, hf_dir, forkserver, kind):
    src = hf_dir if kind == "from_hf" else meta
    if kind == "to_hf":  # without tokenizer.model: its tokenizer.json would import transformers per child
        src = tmp_path / "src"
        shutil.copytree(meta, src, ignore=shutil.ignore_patterns("tokenizer.model"))
    src_hash = snapshot(src)
    # the previous version at the destination: the same writer's output for another model
    other = helpers.make_checkpoint(tmp_path / "other", OTHER, seed=3)
    prev_src = other
    if kind == "from_hf":
        prev_src = tmp_path / "other_hf"
        convert.to_hf(str(other), str(prev_src))
    prev = tmp_path / "prev"
    assert run_writer(forkserver, kind, prev_src, prev, False, 10**9)
    full = tmp_path / "full"
    assert run_writer(forkserver, kind, src, full, False, 10**9)
    want_prev, want_full = contents(prev), contents(full)
    assert want_prev != want_full

    dst = tmp_path / "dst"
    kills, steps = 0, {}
    for overwrite in (False, True):

        def reset() -> None:
            if dst.exists():
                shutil.rmtree(dst)
            if overwrite:
                shutil.copytree(prev, dst)

        reset()  # a full run counts the steps (over an existing directory: the swap and the removal too)
        steps[overwrite] = n_steps = run_writer(forkserver, kind, src, dst, overwrite, 10**9)
        assert contents(dst) == want_full and n_steps >= 4
        for kill_at in range(1, n_steps + 1):  # before every step: each file, rename and removal
            reset()
            assert run_writer(forkserver, kind, src, dst, overwrite, kill_at) is None
            kills += 1
            got = contents(dst)
            allowed = [want_full, want_prev] if overwrite else [want_full, None]
            assert got in allowed, f"{kind} killed before step {kill_at}/{n_steps}: the destination mixes versions"
            if got == want_full:  # what is there loads as the complete result
                if kind == "to_hf":
                    convert.HFWeights(dst)
                else:
                    checkpoint.inspect_dir(dst)
            assert snapshot(src) == src_hash, "the input changed"
    # a run after the kills cleans up what they left and writes the complete result
    run_writer(forkserver, kind, src, dst, True, 10**9)
    assert contents(dst) == want_full
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert kills == steps[False] + steps[True]
    print(f"{kind}: killed before each of {steps[False]} steps into a new directory and {steps[True]} over an existing one")


def test_a_destination_filled_while_writing_is_not_replaced_without_overwrite(tmp_path):
    dst = tmp_path / "dst"
    with pytest.raises(ValueError, match="was filled by something else while this run wrote"):
        with atomic.atomic_output_dir(dst) as tmp:
            (tmp / "mine").write_text("mine")
            dst.mkdir()
            (dst / "theirs").write_text("theirs")  # another run published first
    assert os.listdir(dst) == ["theirs"] and sorted(os.listdir(tmp_path)) == ["dst"]


def test_example_script_verify_flag_names_the_damaged_file(tmp_path, meta):
    ckpt = tmp_path / "c"
    shutil.copytree(meta, ckpt)
    write_checklist(ckpt)
    (ckpt / "params.json").write_text((ckpt / "params.json").read_text() + " ")  # changed after the download
    cmd = [sys.executable, str(helpers.REPO / "example_text_completion.py"), "--ckpt_dir", str(ckpt), "--verify", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=helpers.child_env(), timeout=120)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "does not match its checklist.chk: params.json: md5" in last
    assert "[4/4] tokenizer.model ok" in r.stderr  # progress, one line per file


def test_quantize_over_an_existing_checkpoint_is_refused_and_overwrite_replaces_it_whole(tmp_path, meta):
    dst = tmp_path / "dst"
    shutil.copytree(meta, dst)
    before = snapshot(dst)
    with pytest.raises(ValueError, match=r"already holds 4 file\(s\) .*pass --overwrite to replace it whole"):
        reshard.quantize_checkpoint(str(meta), str(dst), mode="int8")
    assert snapshot(dst) == before
    with pytest.raises(ValueError, match="is the input directory"):
        reshard.quantize_checkpoint(str(meta), str(meta), mode="int8", overwrite=True)
    reshard.quantize_checkpoint(str(meta), str(dst), mode="int8", overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    assert checkpoint.inspect_dir(dst).quant.mode == "int8"


def test_atomic_write_text_replaces_whole_or_leaves_the_old_file(tmp_path, monkeypatch):
    """One file written through the atomic writer: the new text whole, or (a failure before the
    rename) the old file as it was and no temporary file left beside it."""
    path = tmp_path / "out" / "table.json"
    atomic.atomic_write_text(path, "old\n")
    atomic.atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and os.listdir(path.parent) == ["table.json"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_text(path, "half\n")
    assert path.read_text() == "new\n" and os.listdir(path.parent) == ["table.json"]
