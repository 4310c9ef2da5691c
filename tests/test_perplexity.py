"""scripts/perplexity.py against transformers' loss on the converted demo model, with the sliding window of
Hugging Face's perplexity guide (same text, window and stride), and its bad input."""
import json
import subprocess
import sys

import pytest
import torch

import helpers
from llama import Llama
from llama.weights import convert
from llama.demo import DEMO_DIR, TOKENIZER_PATH
from llama.eval.scoring import sliding_windows, windowed_nll
from llama.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

PERPLEXITY = helpers.REPO / "scripts" / "perplexity.py"
TEXT = (helpers.REPO / "tests" / "data" / "demo_heldout_head.txt").read_text()[:3000]
WINDOW = 128


def hf_guide_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of https://huggingface.co/docs/transformers/perplexity: the labels of tokens an earlier
    window scored are -100 and transformers computes the mean loss over the rest. The guide weights
    each window's mean by its label count less one (the label transformers' shift drops), which is
    one too few when the dropped label was already -100 (overlapping windows); here the weight is
    the number of labels transformers' loss did average over."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()  # transformers shifts the labels by one
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    convert.to_hf(str(DEMO_DIR), str(out))
    return transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.parametrize("stride", [WINDOW, 48])  # disjoint windows, and overlapping ones
def test_sliding_window_loss_equals_transformers(hf_model, stride):
    llama = Llama.build(str(DEMO_DIR), str(TOKENIZER_PATH), max_seq_len=WINDOW, max_batch_size=3, device="cpu", dtype="float32")
    ids = llama.tokenizer.encode(TEXT, bos=True, eos=False)
    assert len(ids) > 4 * WINDOW
    nll, n = windowed_nll(llama.model, ids, WINDOW, stride, batch_size=3)
    hf_nll, hf_n = hf_guide_nll(hf_model, torch.tensor([ids]), WINDOW, stride)
    assert n == hf_n
    assert nll / n == pytest.approx(hf_nll / hf_n, abs=1e-4)


def test_windows_score_each_token_at_most_once():
    """Overlapping windows score every token but the first, once; disjoint ones (stride = window) also
    leave out each window's first token, which has no context inside its window (as the guide does)."""
    for n, window, stride in [(1000, 128, 48), (129, 128, 1), (5, 128, 64), (1000, 128, 127)]:
        scored = [t for _, first, end in sliding_windows(n, window, stride) for t in range(first, end)]
        assert scored == list(range(1, n))
    scored = [t for _, first, end in sliding_windows(300, 128, 128) for t in range(first, end)]
    assert scored == [t for t in range(300) if t % 128]
    with pytest.raises(ValueError, match="stride 0 must be between 1 and max_seq_len 128"):
        sliding_windows(10, 128, 0)


def test_script_reports_loss_per_file_and_in_total(tmp_path, hf_model):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT[:1500])
    b.write_text(TEXT[1500:])
    out = tmp_path / "ppl.json"
    proc = subprocess.run(
        [sys.executable, str(PERPLEXITY), *map(str, [a, b, "--max_seq_len", WINDOW, "--stride", 64, "--dtype", "float32",
                                                     "--device", "cpu", "--output_path", out])],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env=helpers.child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "total" in proc.stdout and "window" in proc.stderr  # a table on stdout, progress on stderr
    tok = Tokenizer(str(TOKENIZER_PATH))  # the script's: the demo model's
    total_nll, total_n = 0.0, 0
    for f in (a, b):
        ids = torch.tensor([tok.encode(f.read_text(), bos=True, eos=False)])
        nll, n = hf_guide_nll(hf_model, ids, WINDOW, 64)
        r = report["files"][str(f)]
        assert r["tokens"] == n and r["loss"] == pytest.approx(nll / n, abs=1e-4)
        total_nll, total_n = total_nll + nll, total_n + n
    assert report["total"]["loss"] == pytest.approx(total_nll / total_n, abs=1e-4)


BAD_INPUT = [
    (["missing.txt"], "error: missing.txt: no such file"),
    (["{empty}"], "is empty: there is no token to score"),
    (["{empty}", "--stride", "0"], "error: stride 0 must be between 1 and max_seq_len"),
]


def test_bad_input_is_one_line(tmp_path):
    """A missing file, an empty one and a zero stride: exit 1, the problem on the last line, no
    traceback (the three processes side by side)."""
    (tmp_path / "empty.txt").write_text("")
    commands = [[sys.executable, str(PERPLEXITY), *(str(tmp_path / "empty.txt") if a == "{empty}" else a for a in args)]
                for args, _ in BAD_INPUT]
    procs = helpers.run_at_once(commands, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=helpers.child_env())
    for proc, (args, message) in zip(procs, BAD_INPUT):
        assert proc.returncode == 1, args
        assert message in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr, proc.stderr[-1500:]
