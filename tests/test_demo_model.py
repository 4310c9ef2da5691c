"""The bundled demo model: it loads strictly, completes a fixed prompt exactly as recorded, keeps
its held-out quality, and the training script that made it still trains."""
import sys
from pathlib import Path

import pytest
import torch

import helpers
from llama import Llama
from llama.weights.checkpoint import expected_keys, load_shard
from llama.demo import DEMO_DIR, DRAFT_DIR, TOKENIZER_PATH, resolve_paths

sys.path.insert(0, str(helpers.REPO / "recipes" / "demo"))  # the recipes under test
import evaluate_demo  # noqa: E402
import teacher_corpus  # noqa: E402
import train_demo  # noqa: E402

HELDOUT_SAMPLE = Path(__file__).parent / "data" / "demo_heldout_head.txt"  # head of the held-out split
# Greedy float32 completions recorded from the shipped checkpoint.
GOLDEN = {
    "The list data type has some more methods.": " The most common usage of the most common usage of the standard"
    " library is that you can use the library to create a library",
    "A dictionary is": " a dictionary containing the names of the dictionary, and the dictionary is returned. The"
    " dictionary is returned if the dictionary is empty",
}
# Measured 3.466 on the sample; the bigram baseline is 4.9 on the whole held-out split.
HELDOUT_LOSS_BOUND = 3.55
# Greedy acceptance of the shipped draft at k=3 in float32 on the sample's two opening prompts
# (test below): measured 0.357 (the draft before, distilled on the corpus alone: 0.335).
DRAFT_ACCEPTANCE_BOUND = 0.3


@pytest.fixture(scope="module")
def demo() -> Llama:
    ckpt, tok = resolve_paths(None, None)
    return Llama.build(ckpt, tok, max_seq_len=512, max_batch_size=2, device="cpu", dtype="float32")


def test_demo_checkpoint_is_small_and_has_exactly_the_llama3_keys():
    state = load_shard(DEMO_DIR / "consolidated.00.pth")
    assert set(state) == expected_keys(8)
    size = sum(p.stat().st_size for p in (DEMO_DIR / "consolidated.00.pth", TOKENIZER_PATH))
    assert size <= 25 * 2**20
    assert all(v.dtype.is_floating_point and v.element_size() == 2 for v in state.values())  # bfloat16


def test_golden_greedy_completion(demo):
    prompts = list(GOLDEN)
    out = demo.text_completion(prompts, temperature=0, max_gen_len=24)
    assert [o["generation"] for o in out] == [GOLDEN[p] for p in prompts]


def test_heldout_loss_stays_below_bound(demo):
    ids = evaluate_demo.encode_docs(demo.tokenizer, HELDOUT_SAMPLE)
    assert len(ids) > 10_000
    assert evaluate_demo.model_nll(demo, ids, 512) < HELDOUT_LOSS_BOUND


def test_shipped_draft_is_at_most_an_eighth_of_the_demo_and_keeps_its_acceptance():
    size = {d: sum(v.numel() for v in load_shard(d / "consolidated.00.pth").values()) for d in (DEMO_DIR, DRAFT_DIR)}
    assert size[DRAFT_DIR] <= size[DEMO_DIR] / 8
    spec = Llama.build(str(DEMO_DIR), str(TOKENIZER_PATH), max_seq_len=256, max_batch_size=2, device="cpu",
                       dtype="float32", draft_ckpt_dir=str(DRAFT_DIR), speculate_k=3)
    docs = HELDOUT_SAMPLE.read_text().split("\n\n\n")
    prompts = [spec.tokenizer.encode(d.strip()[:200], bos=True, eos=False)[:24] for d in docs[:2]]
    spec.generate(prompts, 64, temperature=0)
    assert spec.speculator.acceptance_rate > DRAFT_ACCEPTANCE_BOUND


def test_short_training_run_lowers_loss_and_writes_a_loadable_checkpoint(tmp_path):
    text = HELDOUT_SAMPLE.read_text()
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus_train.txt").write_text(text[:30000])
    (data / "corpus_heldout.txt").write_text(text[30000:])
    out = tmp_path / "out"
    result = train_demo.train(
        data_dir=str(data), tokenizer_path=str(TOKENIZER_PATH), out_dir=str(out), work_dir=str(tmp_path / "work"),
        max_steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup=5, eval_every=20, save_every=20,
        device="cpu", params={"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2},
    )
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    llama = Llama.build(str(out), str(TOKENIZER_PATH), max_seq_len=64, max_batch_size=1, device="cpu")
    assert llama.text_completion(["The"], max_gen_len=4, temperature=0)[0]["generation"]
    # resuming from the saved state continues where it stopped
    again = train_demo.train(
        data_dir=str(data), tokenizer_path=str(TOKENIZER_PATH), out_dir=str(out), work_dir=str(tmp_path / "work"),
        max_steps=40, batch_size=8, seq_len=64, device="cpu", params={"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2},
    )
    assert again["losses"] == []
    # distilling from itself, warm-started from itself: the KL loss starts at zero
    same = train_demo.train(
        data_dir=str(data), tokenizer_path=str(TOKENIZER_PATH), out_dir=str(tmp_path / "same"), work_dir=str(tmp_path / "w2"),
        max_steps=2, batch_size=4, seq_len=64, lr=1e-4, warmup=1, device="cpu", init_from=str(out), distill_from=str(out),
        params={"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2},
    )
    assert same["losses"][0] == pytest.approx(0, abs=1e-4)
    # keep="last" writes the last evaluation's weights, whatever their held-out loss
    last = tmp_path / "last"
    train_demo.train(
        data_dir=str(data), tokenizer_path=str(TOKENIZER_PATH), out_dir=str(last), work_dir=str(tmp_path / "w3"),
        max_steps=2, batch_size=4, seq_len=64, lr=1e-4, warmup=1, eval_every=1, device="cpu", init_from=str(out),
        distill_from=str(out), params={"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2}, keep="last",
    )
    final = torch.load(tmp_path / "w3" / "state.pt")["model"]
    assert all(torch.equal(v, final[k].to(v.dtype)) for k, v in load_shard(last / "consolidated.00.pth").items())
    with pytest.raises(ValueError, match="pass best or last"):
        train_demo.train(keep="first")
    # another head split keeps the copied embeddings, norms and FFN, not the attention
    train_demo.distributed.setup(torch.device("cpu"))  # idempotent for a group of one
    shape = {**train_demo.DEMO_PARAMS, "dim": 64, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 4352}
    other = train_demo.Transformer(train_demo.ModelArgs(**shape))
    other.init_weights()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    source = train_demo.load_trained(str(out), torch.device("cpu"), 64)
    train_demo.warm_start(other, source)
    src = load_shard(out / "consolidated.00.pth")
    for name, v in other.state_dict().items():
        if ".attention." in name:
            assert torch.equal(v, before[name]), name
        else:
            assert torch.equal(v, src[name].float()), name
    # ...and the transfer fits that attention to the source's: the relative error falls from ~1
    data = train_demo.load_data(train_demo.Tokenizer(str(TOKENIZER_PATH)), data, tmp_path / "work" / "data.pt")
    errors = train_demo.transfer_attention(other, source, data, 30, 4, 64, 0.0, 0, 3e-3)
    assert errors[0] > 0.5 and errors[-1] < errors[0] / 2
    with pytest.raises(ValueError, match="pass --init_from DIR too"):
        train_demo.train(transfer_steps=5)


def test_teacher_corpus_holds_the_models_own_greedy_continuations_after_the_corpus(tmp_path, demo):
    data = tmp_path / "data"
    data.mkdir()
    docs = [d.strip()[:4000] for d in HELDOUT_SAMPLE.read_text().split("\n\n\n")][:2]
    (data / "corpus_train.txt").write_text("\n\n\n".join(docs) + "\n")
    (data / "corpus_heldout.txt").write_text("held out\n")
    out = tmp_path / "teacher"
    teacher_corpus.main(data_dir=str(data), out_dir=str(out), n_prompts=2, prompt_len=(4, 6), new_tokens=8,
                        temperatures=(0.0,), batch_size=2, seed=3, dtype="float32")
    written = teacher_corpus.read_documents(out / "corpus_train.txt")
    assert written[:2] == docs and len(written) == 4
    assert (out / "corpus_heldout.txt").read_text() == "held out\n"
    # each continuation is a corpus prefix followed by the model's own greedy continuation of it
    prompts = teacher_corpus.corpus_prefixes(demo.tokenizer, docs, 2, 4, 6, seed=3)
    assert all(demo.tokenizer.decode(p[1:]) in docs[0] + docs[1] for p in prompts)
    tokens, _ = demo.generate(prompts, 8, temperature=0, echo=True)
    assert written[2:] == [demo.tokenizer.decode(t[1:]).strip() for t in tokens]
    with pytest.raises(FileNotFoundError, match="demo_corpus.py"):
        teacher_corpus.main(data_dir=str(tmp_path / "none"), out_dir=str(out))


GREEDY = ["--max_gen_len", 24, "--device", "cpu", "--dtype", "float32", "--temperature", 0]


def test_demo_model_on_several_processes_prints_what_one_prints():
    """The demo's shape (8 query heads, 2 KV heads, vocabulary and FFN divisible by 4) shards on 2
    and 4 processes with no arguments; in float32 greedy decoding they print what one process
    prints, and so does speculative decoding with the bundled draft (replicated on every rank).
    The four launches start side by side (the ranks' start-up fills cores the others leave idle)."""
    import concurrent.futures

    launches = {"1": (1, []), "2": (2, []), "4": (4, []), "2-speculate": (2, ["--speculate"])}
    with concurrent.futures.ThreadPoolExecutor(len(launches)) as pool:
        runs = dict(zip(launches, pool.map(lambda job: helpers.run_torchrun("example_text_completion.py", GREEDY + job[1], job[0]),
                                           launches.values())))
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr[-3000:])
    one = runs.pop("1")
    assert "using the bundled demo model" in one.stderr  # the examples default to it
    assert one.stdout.count("> ") >= 4
    for name, r in runs.items():
        assert r.stdout == one.stdout, name
