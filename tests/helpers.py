"""Test utilities: random Meta checkpoints, a byte-level tokenizer, real multi-process runs, and the
OpenAI-compatible server in a subprocess (tests/test_server.py, tests/test_evaluate.py)."""
import base64
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from llama import registry
from llama.weights.save import save_checkpoint
from llama.model import ModelArgs

if TYPE_CHECKING:
    from llama import Llama

REPO = Path(__file__).resolve().parent.parent

TINY_PARAMS = registry.get("tiny")  # grouped-query: 4 heads share 2 KV heads; 512 = 256 bytes + 256 specials


def random_state_dict(params: dict, seed: int = 0) -> dict:
    """Full (unsharded) random weights for `params`, scaled so logits are decisive (no near ties)."""
    args = ModelArgs(**params)
    g = torch.Generator().manual_seed(seed)
    kv_dim = (args.n_kv_heads or args.n_heads) * args.head_dim
    hidden = args.ffn_hidden_dim

    def mat(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) / in_f**0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(args.dim, generator=g)

    sd = {"tok_embeddings.weight": torch.randn(args.vocab_size, args.dim, generator=g)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = mat(args.dim, args.dim)
        sd[p + "attention.wk.weight"] = mat(kv_dim, args.dim)
        sd[p + "attention.wv.weight"] = mat(kv_dim, args.dim)
        sd[p + "attention.wo.weight"] = mat(args.dim, args.dim)
        sd[p + "feed_forward.w1.weight"] = mat(hidden, args.dim)
        sd[p + "feed_forward.w2.weight"] = mat(args.dim, hidden)
        sd[p + "feed_forward.w3.weight"] = mat(hidden, args.dim)
        sd[p + "attention_norm.weight"] = norm()
        sd[p + "ffn_norm.weight"] = norm()
    sd["norm.weight"] = norm()
    sd["output.weight"] = mat(args.vocab_size, args.dim) * 4.0
    return sd


def make_checkpoint(out_dir: Path, params: Optional[dict] = None, n_shards: int = 1, seed: int = 0) -> Path:
    params = dict(TINY_PARAMS if params is None else params)
    save_checkpoint(random_state_dict(params, seed), params, out_dir, n_shards=n_shards)
    return out_dir


def write_byte_tokenizer(path: Path) -> Path:
    """A tiktoken BPE file of the 256 single bytes (no merges): n_words = 256 + 256 specials = 512."""
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path


def child_env(**extra: str) -> dict:
    """Environment for a child process: this repo first on PYTHONPATH (keeping what was there), one
    thread per process so several processes share the 2 CI cores fairly."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def broken_compile(fn, **kwargs):
    """A stand-in for torch.compile whose compiled functions raise at their first call, as a
    compiler that cannot handle the model would (monkeypatch torch.compile with it)."""

    def step(*args):
        raise RuntimeError("no compiler here")

    return step


def run_at_once(commands: list, **kwargs) -> list:
    """subprocess.run of each independent command at the same time (the same keyword arguments for
    each, a dict of its own where it needs one: ("cmd", {"env": ...})), results in order. A fresh
    process spends its first seconds importing on one core: started side by side, they share the
    CI machine's two cores instead of queueing on one."""
    def one(command):
        cmd, own = command if isinstance(command, tuple) else (command, {})
        return subprocess.run(cmd, **{**kwargs, **own})

    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(one, commands))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    script: str, args: list, nproc: int, timeout: float = 300, env: Optional[dict] = None, input: Optional[str] = None
):
    """Run `script` under torchrun with `nproc` real processes on this machine (gloo on CPU);
    `input` is the text piped to their standard input."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        script, *map(str, args),
    ]
    full_env = child_env(**(env or {}))
    return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full_env)


SERVER_KEY = "test-key"  # the API key every test server asks


class Served:
    """A server started by `start_server`: its process, port, model id and log file."""

    def __init__(self, proc: subprocess.Popen, port: int, model: str, log):
        self.proc, self.port, self.model, self.log = proc, port, model, log
        self.base = f"http://127.0.0.1:{port}"

    def client(self, key: str = SERVER_KEY, timeout: float = 60):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=timeout)

    def health(self) -> dict:
        import httpx

        return httpx.get(self.base + "/health", timeout=10).json()

    def output(self) -> str:
        self.log.flush()
        return open(self.log.name).read()


def start_server(tmp_path: Path, ckpt, tokenizer, nproc: int = 1, max_seq_len: int = 96, extra: tuple = ()) -> Served:
    """scripts/serve.py (under torchrun when nproc > 1) on a free loopback port, CPU float32, 4 rows,
    key SERVER_KEY, on `ckpt` (None: the bundled demo model); returns once /health answers (its output
    goes to a log file under tmp_path). A port that another process took between free_port and the
    server's bind (an ephemeral port of some client's connection) is replaced, twice at most."""
    for attempt in range(3):
        try:
            return _start_server(tmp_path, ckpt, tokenizer, nproc, max_seq_len, extra)
        except PortTaken:
            if attempt == 2:
                raise


class PortTaken(RuntimeError):
    pass


def _start_server(tmp_path: Path, ckpt, tokenizer, nproc: int, max_seq_len: int, extra: tuple) -> Served:
    import httpx

    port = free_port()
    model = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(tokenizer)] if ckpt is not None else []  # None: the demo
    args = [*model, "--port", str(port), "--device", "cpu",
            "--dtype", "float32", "--max_seq_len", str(max_seq_len), "--max_batch_size", "4", "--max_queue", "16",
            "--api_key", SERVER_KEY, *extra]
    if nproc == 1:
        cmd = [sys.executable, "scripts/serve.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "scripts/serve.py", *args]
    log = open(tmp_path / f"server-{port}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    served = Served(proc, port, os.path.basename(os.path.normpath(str(ckpt))) if ckpt is not None else "llama3-demo", log)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            error = PortTaken if "address already in use" in served.output() else RuntimeError
            raise error(f"the server exited with {proc.returncode}:\n{served.output()[-3000:]}")
        try:
            if served.health()["status"] == "ok":
                return served
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up in 120 s:\n" + served.output()[-3000:])


def stop_server(served: Served) -> None:
    """Ctrl-C, as a person stops it; killed if it has not exited 30 s later."""
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGINT)
        try:
            served.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()
    served.log.close()


def alone(llama: "Llama", prompt, n: int) -> list:
    """Greedy tokens of one prompt (text or token ids) generated by itself: what a server must answer."""
    tokens = prompt if isinstance(prompt, list) else llama.tokenizer.encode(prompt, bos=True, eos=False)
    return llama.generate([tokens], max_gen_len=n, temperature=0)[0][0]


def concurrent_completions(served: Served, prompts, lengths, stagger: float = 0.05) -> list:
    """Greedy completions of `prompts`, one client thread each, arriving `stagger` s apart."""
    client = served.client()

    def one(i):
        time.sleep(stagger * i)  # arrivals while others decode; 4 rows for 6 requests: some wait
        return client.completions.create(model=served.model, prompt=prompts[i], max_tokens=lengths[i], temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, range(len(prompts))))


def check_against_generate(llama: "Llama", results: list, prompts, lengths) -> None:
    """Each completion's text, token count and finish reason are those of `alone`."""
    for r, p, n in zip(results, prompts, lengths):
        want = alone(llama, p, n)
        choice = r.choices[0]
        assert choice.text == llama.tokenizer.decode(want), p
        assert r.usage.completion_tokens == len(want)
        assert choice.finish_reason == ("length" if len(want) == n else "stop")
