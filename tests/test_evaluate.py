"""llama/eval/ (scripts/evaluate.py, llama-eval) against lm-eval's own `hf` model on the converted demo
model, and against lm-eval's `local-completions` model pointed at our server (scripts/serve.py), on every
task of the bundled suite, read from lm-eval's own results and samples files; two processes under
torchrun against one; the suite loads offline from anywhere; bad input is one line."""
import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import helpers

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.loggers import EvaluationTracker  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from llama import Llama  # noqa: E402
from llama.weights import convert  # noqa: E402
from llama.demo import DEMO_DIR, TOKENIZER_PATH  # noqa: E402
from llama.eval.tasks import SUITE  # noqa: E402
from llama.eval.harness import check_tokenizer, evaluate, prepare_tasks, task_manager_for  # noqa: E402
from llama.eval.lm import LlamaLM  # noqa: E402
from llama.weights.hf import write_hf_tokenizer  # noqa: E402

TASKS = ["llama_demo_next_sentence", "llama_demo_perplexity", "llama_demo_next_word"]
EVALUATE = helpers.REPO / "scripts" / "evaluate.py"
LIMIT = 4
MAX_LEN = 256  # short enough that the perplexity pieces (up to 1,500 characters) take two windows
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def read_outputs(out_dir: Path) -> tuple[dict, dict]:
    """lm-eval's results JSON and {task: [samples by doc_id]} from the files its EvaluationTracker wrote."""
    (results_file,) = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    samples = {}
    for task in TASKS:
        (path,) = glob.glob(str(out_dir / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return json.loads(Path(results_file).read_text()), samples


def scores(sample: dict) -> list[tuple[float, str]]:
    """(log-likelihood, greedy flag or "") per request of one loglikelihood or rolling sample."""
    firsts = [r[0] for r in sample["resps"]]  # ["ll", "greedy"] (loglikelihood) or "ll" (rolling)
    return [(float(x), "") if isinstance(x, str) else (float(x[0]), x[1]) for x in firsts]


def assert_same_samples(ours: list[dict], theirs: list[dict], task: str, rel: float = 2e-7) -> None:
    """Same documents and prompts; same generations; log-likelihoods within 1e-4 or `rel` of their
    size, whichever is larger: a rolling document's is a float32 sum of hundreds of tokens' (about
    -1000 nats), where float32's own rounding (1.2e-7 relative) is already 1e-4."""
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert a["doc_hash"] == b["doc_hash"] and a["prompt_hash"] == b["prompt_hash"]
        if task == "llama_demo_next_word":
            assert a["resps"] == b["resps"] and a["filtered_resps"] == b["filtered_resps"]
            continue
        sa, sb = scores(a), scores(b)
        assert [x for x, _ in sa] == pytest.approx([x for x, _ in sb], abs=1e-4, rel=rel), task
        assert [g for _, g in sa] == [g for _, g in sb], task


def metrics(results: dict, task: str) -> dict:
    return {k: v for k, v in results["results"][task].items() if "," in k and "stderr" not in k}


def run_lm_eval(out_dir: Path, model, **kwargs) -> tuple[dict, dict]:
    """lm-eval's simple_evaluate of `model` (an LM, or a registered name with model_args) on the
    suite at LIMIT, its files written as lm-eval's CLI writes them; read back as read_outputs does."""
    tracker = EvaluationTracker(output_path=str(out_dir))
    results = lm_eval.simple_evaluate(model=model, tasks=[SUITE], task_manager=task_manager_for([SUITE]), limit=LIMIT,
                                      log_samples=True, evaluation_tracker=tracker, bootstrap_iters=0, **kwargs)
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return read_outputs(out_dir)


def assert_same_outputs(ours: tuple[dict, dict], theirs: tuple[dict, dict]) -> None:
    """Every task: the same samples (assert_same_samples) and the same metrics."""
    (results_a, samples_a), (results_b, samples_b) = ours, theirs
    for task in TASKS:
        assert_same_samples(samples_a[task], samples_b[task], task)
        ma, mb = metrics(results_a, task), metrics(results_b, task)
        assert ma.keys() == mb.keys() and ma
        for k in ma:
            assert ma[k] == pytest.approx(mb[k], rel=1e-6), (task, k)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> tuple[dict, dict]:
    """Our evaluation of the demo model on the suite (LIMIT, MAX_LEN, float32), from its output files."""
    out = tmp_path_factory.mktemp("in_process")
    llama = Llama.build(str(DEMO_DIR), str(TOKENIZER_PATH), max_seq_len=MAX_LEN, max_batch_size=4, device="cpu", dtype="float32")
    evaluate(LlamaLM(llama, batch_size=4), limit=LIMIT, log_samples=True, output_path=str(out), bootstrap_iters=0,
             prepared=prepare_tasks(SUITE))
    return read_outputs(out)


def test_every_task_matches_lm_eval_hf_model(tmp_path, in_process):
    """Same per-sample log-likelihoods (1e-4, float32), generations and scores as lm-eval's hf model
    with add_bos_token=True on the converted demo model, in lm-eval's own output files."""
    convert.to_hf(str(DEMO_DIR), str(tmp_path / "hf"))
    hf = HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", add_bos_token=True, max_length=MAX_LEN,
              batch_size=4, device="cpu")
    assert_same_outputs(in_process, run_lm_eval(tmp_path / "theirs", hf))


def test_local_completions_on_the_server_matches_in_process(tmp_path, in_process, monkeypatch):
    """lm-eval's `local-completions` model pointed at scripts/serve.py (demo model, float32) gives, on
    every task, the per-sample log-likelihoods (1e-4), greedy flags, generations and metrics of the
    in-process evaluation: the model_args docs/evaluation.md ("Against the server") gives for a server.

    Token-id prompts (tokenized_requests, lm-eval's default) are scored as sent; the converted HF
    tokenizer (a local directory: nothing downloaded) with add_bos_token=True tokenizes as LlamaLM
    does, <|begin_of_text|> first; max_length MAX_LEN + 2 because lm-eval's API models keep
    max_length - 1 tokens of a request (one is generated) and roll windows of max_length - 2, where
    LlamaLM keeps MAX_LEN + 1 and rolls windows of MAX_LEN.
    """
    pytest.importorskip("tenacity")  # with aiohttp and requests: lm-eval[api], which its API models need
    for name, value in {**OFFLINE, "OPENAI_API_KEY": helpers.SERVER_KEY}.items():  # lm-eval sends this key
        monkeypatch.setenv(name, value)
    write_hf_tokenizer(str(TOKENIZER_PATH), str(tmp_path / "tokenizer"))
    served = helpers.start_server(tmp_path, DEMO_DIR, TOKENIZER_PATH, max_seq_len=MAX_LEN + 2)
    try:
        model_args = (f"model={served.model},base_url={served.base}/v1/completions,tokenizer_backend=huggingface,"
                      f"tokenizer={tmp_path / 'tokenizer'},add_bos_token=True,max_length={MAX_LEN + 2},max_retries=1")
        theirs = run_lm_eval(tmp_path / "served", "local-completions", model_args=model_args, batch_size=4)
    finally:
        helpers.stop_server(served)
    assert_same_outputs(in_process, theirs)
    # real scores compared, not one constant: every request's log-likelihood differs from the others
    lls = [x for task in TASKS[:2] for sample in theirs[1][task] for x, _ in scores(sample)]
    assert len({round(x, 3) for x in lls}) == len(lls) > LIMIT


def test_rolling_windows_score_every_token_once():
    """A string longer than max_length is scored in disjoint windows: the sum over them equals one
    forward pass over the whole string with a long enough window (same model, plain math)."""
    from lm_eval.api.instance import Instance

    llama = Llama.build(str(DEMO_DIR), str(TOKENIZER_PATH), max_seq_len=512, max_batch_size=4, device="cpu", dtype="float32")
    text = (helpers.REPO / "tests" / "data" / "demo_heldout_head.txt").read_text()[:1200]
    n = len(llama.tokenizer.encode(text, bos=True, eos=False))
    assert 64 < n < 512
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    short = LlamaLM(llama, batch_size=2, max_length=64).loglikelihood_rolling(req)[0]
    whole = LlamaLM(llama, batch_size=2).loglikelihood_rolling(req)[0]
    ids = torch.tensor([llama.tokenizer.encode(text, bos=True, eos=False)])
    with torch.inference_mode():
        lp = torch.log_softmax(llama.model.forward_train(torch.cat([ids[:, :1], ids[:, :-1]], 1)), -1)
    # lm-eval's rolling windows (hf with add_bos_token=True) also score the leading <|begin_of_text|> after a prefix one
    direct = lp[0].gather(1, ids[0][:, None]).sum().item()
    assert whole == pytest.approx(direct, abs=1e-3)
    assert short != pytest.approx(whole, abs=1e-3)  # less context per token: a different number


def test_two_processes_give_the_results_of_one(tmp_path, byte_tokenizer):
    """scripts/evaluate.py under torchrun with 2 ranks (the model split in two) writes the results and
    samples that one process computes."""
    ckpt = helpers.make_checkpoint(tmp_path / "tiny")
    shutil.copy(byte_tokenizer, ckpt / "tokenizer.model")
    out = tmp_path / "out2"
    proc = helpers.run_torchrun(
        str(EVALUATE),
        ["--ckpt_dir", ckpt, "--limit", 3, "--max_seq_len", 256, "--batch_size", 4, "--device", "cpu", "--dtype", "float32",
         "--log_samples", "--bootstrap_iters", 0, "--output_path", out],
        nproc=2, env=OFFLINE,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("llama_demo_next_sentence") == 1  # one table, from rank 0
    llama = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=256, max_batch_size=4, device="cpu", dtype="float32")
    evaluate(LlamaLM(llama, batch_size=4), limit=3, log_samples=True, output_path=str(tmp_path / "out1"), bootstrap_iters=0)
    (r1, s1), (r2, s2) = read_outputs(tmp_path / "out1"), read_outputs(out)
    for task in TASKS:
        # the random model's sums reach thousands of nats, where one float32 step is 2.4e-4
        assert_same_samples(s1[task], s2[task], task, rel=1e-6)
        assert metrics(r1, task) == pytest.approx(metrics(r2, task), rel=1e-5)


def test_bundled_tasks_load_offline_from_another_directory(tmp_path, monkeypatch):
    """The suite's data files resolve against the package, not the working directory."""
    monkeypatch.chdir(tmp_path)
    _, tasks = prepare_tasks(SUITE)
    sizes = {t.task_name: len(list(t.test_docs())) for t in tasks}
    assert set(sizes) == set(TASKS) and all(n > 50 for n in sizes.values())


def test_unknown_task_is_lm_evals_message():
    # not among the bundled tasks: lm-eval's own are indexed too before giving up (tens of seconds)
    with pytest.raises(ValueError, match=r"^Tasks not found: no_such_task_xyz \(list them with `lm-eval ls tasks`"):
        task_manager_for([SUITE, "no_such_task_xyz"])


def test_task_that_needs_a_download_is_one_line_naming_the_dataset(tmp_path):
    """With no network (offline here), before any model is loaded; one `error:` line, exit status 1."""
    (tmp_path / "hub_task.yaml").write_text(
        "task: needs_the_hub\ndataset_path: someone/not_cached_here\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
    )
    proc = subprocess.run([sys.executable, str(EVALUATE), "--tasks", "needs_the_hub", "--include_path", str(tmp_path)],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path, env=helpers.child_env(**OFFLINE))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: task needs_the_hub: cannot load its dataset someone/not_cached_here"), proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [proc.stderr.strip().splitlines()[-1]]
    assert "Traceback" not in proc.stderr and "Loaded in" not in proc.stderr


def test_a_tokenizer_that_is_not_the_checkpoints_is_refused(tmp_path, byte_tokenizer):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(TOKENIZER_PATH, ckpt / "tokenizer.model")
    check_tokenizer(str(ckpt), str(TOKENIZER_PATH))  # the same file elsewhere is fine
    with pytest.raises(ValueError, match="is not the tokenizer of"):
        check_tokenizer(str(ckpt), str(byte_tokenizer))
    with pytest.raises(ValueError, match="4352 tokens but .* vocab_size 512"):  # Llama.build checks the size
        tiny = helpers.make_checkpoint(tmp_path / "tiny")
        Llama.build(str(tiny), str(TOKENIZER_PATH), max_seq_len=32, max_batch_size=1, device="cpu")
