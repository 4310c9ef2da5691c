"""The Llama generator: batching, echo, logprobs, stop tokens, limits, errors, streaming, and
tensor-parallel runs in real processes."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import helpers
from llama import Llama


@pytest.fixture(scope="module")
def llama(tiny_ckpt, byte_tokenizer) -> Llama:
    return Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32")


def encode(llama: Llama, texts):
    return [llama.tokenizer.encode(t, bos=True, eos=False) for t in texts]


def forward_logprobs(llama: Llama, tokens: list) -> list:
    """Log-probability of each token after the first, from one full forward pass."""
    llama.model.free_cache()
    logits = llama.model(torch.tensor([tokens]), 0)[0]
    return F.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0].tolist()


def test_batch_of_mixed_lengths_matches_each_prompt_alone(llama):
    prompts = encode(llama, ["Hi", "A somewhat longer prompt here", "Medium prompt"])
    batched, _ = llama.generate(prompts, max_gen_len=10, temperature=0)
    for p, b in zip(prompts, batched):
        alone, _ = llama.generate([p], max_gen_len=10, temperature=0)
        assert alone[0] == b
    assert all(len(b) == 10 for b in batched)  # random weights: no stop token within 10 steps


def test_echo_and_logprobs_equal_the_forward_pass(llama):
    prompt = encode(llama, ["Logprobs test"])[0]
    tokens, lps = llama.generate([prompt], max_gen_len=6, temperature=0, logprobs=True, echo=True)
    assert tokens[0][: len(prompt)] == prompt and len(tokens[0]) == len(prompt) + 6
    expected = [0.0] + forward_logprobs(llama, tokens[0])
    assert lps[0] == pytest.approx(expected, abs=1e-4)
    gen, gen_lps = llama.generate([prompt], max_gen_len=6, temperature=0, logprobs=True)
    assert gen[0] == tokens[0][len(prompt):]
    assert gen_lps[0] == pytest.approx(expected[len(prompt):], abs=1e-4)


def test_greedy_tokens_are_the_argmax_of_the_forward_pass(llama):
    prompt = encode(llama, ["Argmax"])[0]
    tokens, _ = llama.generate([prompt], max_gen_len=5, temperature=0)
    seq = prompt + tokens[0]
    llama.model.free_cache()
    logits = llama.model(torch.tensor([seq]), 0)[0]
    assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == tokens[0]


def test_stop_tokens_cut_the_output(llama, monkeypatch):
    prompt = encode(llama, ["Stop here"])[0]
    full, _ = llama.generate([prompt], max_gen_len=8, temperature=0)
    monkeypatch.setattr(llama.tokenizer, "stop_tokens", list(llama.tokenizer.stop_tokens) + [full[0][3]])
    cut, lps = llama.generate([prompt], max_gen_len=8, temperature=0, logprobs=True)
    first = full[0].index(full[0][3])
    assert cut[0] == full[0][:first] and len(lps[0]) == first


def test_max_gen_len_and_max_seq_len_bound_the_output(llama):
    prompts = encode(llama, ["x" * 40, "y"])
    tokens, _ = llama.generate(prompts, max_gen_len=30, temperature=0)
    assert len(tokens[0]) == 64 - len(prompts[0])  # reaches max_seq_len first
    assert len(tokens[1]) == 30
    assert llama.generate(prompts, max_gen_len=0, temperature=0)[0] == [[], []]


def test_sampling_with_a_seed_is_reproducible(llama):
    prompts = encode(llama, ["Seeded", "sampling run"])
    a, _ = llama.generate(prompts, max_gen_len=8, temperature=1.0, top_p=0.95, seed=3)
    b, _ = llama.generate(prompts, max_gen_len=8, temperature=1.0, top_p=0.95, seed=3)
    c, _ = llama.generate(prompts, max_gen_len=8, temperature=1.0, top_p=0.95, seed=4)
    assert a == b and a != c


def test_text_and_chat_completion_results(llama):
    out = llama.text_completion(["Hello"], max_gen_len=4, temperature=0, logprobs=True, echo=True)
    assert set(out[0]) == {"generation", "tokens", "logprobs"} and out[0]["generation"].startswith("<|begin_of_text|>Hello")  # echo keeps bos, as the original
    assert len(out[0]["tokens"]) == len(out[0]["logprobs"])
    chat = llama.chat_completion([[{"role": "user", "content": "Hi"}]], max_gen_len=4, temperature=0)
    assert chat[0]["generation"]["role"] == "assistant" and isinstance(chat[0]["generation"]["content"], str)


def test_streaming_equals_generate(llama):
    prompts = encode(llama, ["Stream one", "two", "a third prompt"])
    for kwargs in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 11}):
        tokens, lps = llama.generate(prompts, max_gen_len=9, logprobs=True, **kwargs)
        streamed = [[] for _ in prompts]
        streamed_lps = [[] for _ in prompts]
        for step in llama.stream(prompts, max_gen_len=9, logprobs=True, **kwargs):
            for ev in step:
                if ev.token not in llama.tokenizer.stop_tokens:
                    streamed[ev.index].append(ev.token)
                    streamed_lps[ev.index].append(ev.logprob)
        assert streamed == tokens
        assert streamed_lps == lps


def test_streamed_text_joins_to_the_decoded_whole(llama):
    # The byte tokenizer splits every multi-byte character across tokens.
    prompt = llama.tokenizer.encode("héllo wörld ✓ 漢字 🎉", bos=True, eos=False)
    pieces, tokens = [], []
    for step in llama.stream([prompt[:4], prompt], max_gen_len=12, temperature=1.0, top_p=1.0, seed=5):
        for ev in step:
            if ev.index == 1:
                pieces.append(ev.text)
                tokens.append(ev.token)
    assert "".join(pieces) == llama.tokenizer.decode([t for t in tokens if t not in llama.tokenizer.stop_tokens])
    echo = [llama.tokenizer.decode([t]) for t in prompt]  # sanity: the text itself is multi-byte
    assert any("\ufffd" in e for e in echo)


def test_bad_requests_are_clear_value_errors(llama):
    with pytest.raises(ValueError, match="longer than max_seq_len 64"):
        llama.generate([[1] * 65], max_gen_len=1)
    with pytest.raises(ValueError, match="exceed max_batch_size 4"):
        llama.generate([[1, 2]] * 5, max_gen_len=1)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llama.generate([[1], []], max_gen_len=1)


def test_build_twice_gives_independent_models(tiny_ckpt, byte_tokenizer, llama):
    other = Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32")
    prompt = encode(llama, ["Twice"])
    a, _ = other.generate(prompt, max_gen_len=5, temperature=0)
    b, _ = llama.generate(prompt, max_gen_len=5, temperature=0)
    assert a == b
    assert other.model.layers[0].attention.kv_cache.k is not llama.model.layers[0].attention.kv_cache.k


def test_bad_inputs_name_the_problem(tmp_path, tiny_ckpt, byte_tokenizer):
    def build(ckpt, tok=byte_tokenizer):
        return Llama.build(str(ckpt), str(tok), max_seq_len=32, max_batch_size=1, device="cpu")

    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(tmp_path / "nowhere")
    no_pth = tmp_path / "no_pth"
    no_pth.mkdir()
    shutil.copy(tiny_ckpt / "params.json", no_pth)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint files \(\*\.pth\)"):
        build(no_pth)
    no_params = tmp_path / "no_params"
    no_params.mkdir()
    shutil.copy(tiny_ckpt / "consolidated.00.pth", no_params)
    with pytest.raises(FileNotFoundError, match="params.json is missing"):
        build(no_params)
    small_vocab = tmp_path / "small.model"
    small_vocab.write_text("".join(line + "\n" for line in byte_tokenizer.read_text().splitlines()[:128]))
    with pytest.raises(ValueError, match="has 384 tokens but .* vocab_size 512"):
        build(tiny_ckpt, small_vocab)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        build(tiny_ckpt, tmp_path / "missing.model")


def test_two_processes_on_two_shards_match_one_process(tmp_path, llama, tiny_ckpt_2shards, byte_tokenizer):
    """Two processes match one (this process, built as the worker builds), eager and compiled:
    torch.compile traces the tensor-parallel collectives (llama.distributed.traceable_collectives),
    so compiled passes on two ranks run compiled instead of falling back to eager. Both runs share
    one torchrun launch (the worker's --variants)."""
    from workers.generate import results_of

    one = results_of(llama)
    outs = {"two": tmp_path / "two.pt", "two compiled": tmp_path / "two-compiled.pt"}
    variants = [{"out": str(outs["two"]), "compile": 0}, {"out": str(outs["two compiled"]), "compile": 1}]
    args = ["--ckpt_dir", tiny_ckpt_2shards, "--tokenizer_path", byte_tokenizer, "--variants", json.dumps(variants)]
    r = helpers.run_torchrun("tests/workers/generate.py", args, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {name: torch.load(out) for name, out in outs.items()}
    for two in results.values():
        assert one["tokens"] == two["tokens"]
        assert one["sampled"] == two["sampled"]
        torch.testing.assert_close(two["logits"], one["logits"], atol=1e-5, rtol=0)
        assert two["logprobs"] == [pytest.approx(lp, abs=1e-5) for lp in one["logprobs"]]
    assert "compiled" not in results["two"] and results["two compiled"]["compiled"] == [True]


@pytest.mark.parametrize("nproc", [1, 2])
def test_example_scripts_run_under_torchrun(nproc, tiny_ckpt, tiny_ckpt_2shards, byte_tokenizer):
    """example_text_completion.py and example_chat_completion.py (launched side by side) on 1 and 2
    processes: rank 0 alone prints and logs."""
    import concurrent.futures

    ckpt = tiny_ckpt if nproc == 1 else tiny_ckpt_2shards
    # the byte-level tokenizer spends one token per byte of the long example prompts
    args = ["--ckpt_dir", ckpt, "--tokenizer_path", byte_tokenizer, "--max_gen_len", 8, "--max_seq_len", 2048, "--device", "cpu"]
    scripts = ["example_text_completion.py", "example_chat_completion.py"]
    with concurrent.futures.ThreadPoolExecutor(len(scripts)) as pool:
        runs = list(pool.map(lambda script: helpers.run_torchrun(script, args, nproc), scripts))
    for script, r in zip(scripts, runs):
        assert r.returncode == 0, (script, r.stderr[-3000:])
        assert r.stdout.count("==================================") == 4, script  # rank 0 alone prints
        assert r.stderr.count("Loaded in") == 1 and f"tokenizer {byte_tokenizer} (512 tokens)" in r.stderr, script  # and logs
        assert "loading consolidated" in r.stderr, script


def test_chat_completion_returns_parsed_tool_calls(llama, monkeypatch):
    tok = llama.tokenizer
    call = [tok.python_tag_id] + tok.encode("print(6 * 7)", bos=False, eos=False)
    monkeypatch.setattr(llama, "_generate", lambda *a, **k: ([call], [[]], [tok.eom_id]))
    msg = llama.chat_completion([[{"role": "user", "content": "compute"}]], max_gen_len=4)[0]["generation"]
    assert msg["stop_reason"] == "end_of_message"
    assert msg["tool_calls"][0].tool_name == "code_interpreter"
    assert msg["tool_calls"][0].arguments == {"code": "print(6 * 7)"}
    plain = tok.encode("just text", bos=False, eos=False)
    monkeypatch.setattr(llama, "_generate", lambda *a, **k: ([plain], [[]], [tok.eot_id]))
    msg = llama.chat_completion([[{"role": "user", "content": "hi"}]], max_gen_len=4)[0]["generation"]
    assert msg == {"role": "assistant", "content": "just text"}  # exactly the original's result


def test_scripts_report_bad_input_in_one_line(tmp_path):
    """example_text_completion.py, example_chat_completion.py and scripts/chat.py on a missing
    checkpoint directory: exit 1 and one line naming it (the three processes side by side)."""
    import subprocess
    import sys

    scripts = ["example_text_completion.py", "example_chat_completion.py", "scripts/chat.py"]
    runs = helpers.run_at_once([[sys.executable, script, "--ckpt_dir", str(tmp_path / "missing")] for script in scripts],
                               cwd=helpers.REPO, env=helpers.child_env(), capture_output=True, text=True, timeout=120,
                               stdin=subprocess.DEVNULL)
    for script, r in zip(scripts, runs):
        assert r.returncode == 1, script
        assert r.stderr.strip().splitlines() == [f"error: checkpoint directory {tmp_path / 'missing'} does not exist: "
                                                 "give the directory holding params.json and consolidated.NN.pth"], script
