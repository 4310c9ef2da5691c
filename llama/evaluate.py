"""lm-evaluation-harness on our generator: an `lm_eval` LM, task loading, and lm-eval's own output files.

Requests are tokenized as lm-eval's `hf` model does with `add_bos_token=True` (Llama 3 is evaluated
after <|begin_of_text|>), cut to the same window, and scored the same way, so that scores are
comparable with `lm_eval --model hf` on the converted checkpoint (tests/test_evaluate.py proves it).

Under torchrun every rank runs every request, in the same batches and order (the model is split
across ranks, not the data); lm-eval builds and returns results on LOCAL_RANK 0 only.
"""
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

from tqdm import tqdm

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:  # the optional dependency
    raise ImportError(f"{e}: evaluation needs lm-evaluation-harness: pip install 'llama3-ref[eval]'") from e

from llama import distributed
from llama.eval_tasks import SUITE, TASKS_DIR
from llama.generation import Llama
from llama.scoring import score_batch

logger = logging.getLogger(__name__)


class LlamaLM(TemplateLM):
    """lm-eval's LM interface (loglikelihood, loglikelihood_rolling, generate_until) on a `Llama`.

    batch_size: sequences scored or generated per forward pass (requests sorted longest first, so
        each batch pads little); at most the generator's max_batch_size for generation.
    max_length: longest window in tokens (default: the model's max_seq_len); longer requests keep
        their last max_length tokens, as lm-eval's hf model does.
    max_gen_toks: new tokens a generation request gets when its task does not say.
    seed: the sampling seed of generation requests with do_sample (greedy ones need none).
    """

    def __init__(
        self, llama: Llama, batch_size: int = 8, max_length: Optional[int] = None, max_gen_toks: int = 256, seed: int = 1234
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        params = llama.model.params
        if max_length is not None and not 1 < max_length <= params.max_seq_len:
            raise ValueError(f"max_length {max_length} must be in 2..max_seq_len ({params.max_seq_len})")
        self.llama = llama
        self.tok = llama.tokenizer
        self.batch_size = batch_size
        self._max_length = max_length or params.max_seq_len
        self._max_gen_toks = max_gen_toks
        self.seed = seed
        self._device = llama.device
        self._progress = distributed.is_rank0()

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tok.model.name  # the tokenizer file's name

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """Tokens of `string`, after <|begin_of_text|> unless add_special_tokens is False, as lm-eval's
        hf model with add_bos_token=True: special tokens spelled in the text are those tokens, and a
        string that already starts with <|begin_of_text|> is not given another."""
        bos = add_special_tokens if add_special_tokens is not None else True
        if add_special_tokens is None and string.startswith(self.tok.decode([self.tok.bos_id])):
            bos = False
        return self.tok.encode(string, bos=bos, eos=False, allowed_special="all")

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens))

    def _score_all(self, items: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """_score over `items` in batches of similar lengths (longest first); results in input order."""
        for _, cont in items:
            if not cont:
                raise ValueError("an empty continuation cannot be scored")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}: "
                    "build with a larger max_seq_len"
                )
        order = Collator(items, sort_fn=lambda x: (-len(x[0] + x[1]), tuple(x[0] + x[1])))
        results = []
        with tqdm(total=len(items), desc=desc, disable=disable_tqdm or not self._progress) as bar:
            for batch in order.get_batched(n=self.batch_size):
                # the last max_length + 1 tokens, as lm-eval's hf model keeps (the continuation fits)
                kept = [((ctx + cont)[-(self.max_length + 1) : -len(cont)], cont) for ctx, cont in batch]
                results += score_batch(self.llama.model, kept, self.llama.policy)
                bar.update(len(batch))
        return order.get_original(results)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        items = [(ctx, cont) for _, ctx, cont in requests]
        results = self._score_all(items, "loglikelihood", disable_tqdm)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string, after <|begin_of_text|>, in windows of max_length
        tokens where each window scores only the tokens no earlier window scored (lm-eval's rolling
        windows: every token is predicted once, with as much context as fits)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            ):
                windows.append(lm_utils.make_disjoint_window(w))
                owner.append(i)
        scores = self._score_all(windows, "loglikelihood_rolling", disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for each (context, gen_kwargs) until a stop string, a stop token or max_gen_toks;
        greedy unless gen_kwargs ask for sampling (temperature, top_p)."""
        eos = self.tok_decode([self.eot_token_id])
        order = Collator(
            [req.args for req in requests],
            sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
            group_by="gen_kwargs",
            group_fn=lambda x: x[1],
        )
        batch_size = min(self.batch_size, self.llama.model.params.max_batch_size)
        results = []
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self._progress) as bar:
            for batch in order.get_batched(n=batch_size):
                contexts, all_kwargs = zip(*batch)
                kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = kwargs.pop("max_gen_toks")
                do_sample, temperature = kwargs.pop("do_sample", False), float(kwargs.pop("temperature", 0.0))
                temperature = temperature if do_sample else 0.0
                top_p = float(kwargs.pop("top_p", 1.0))
                if kwargs:
                    logger.warning("generation arguments %s are not supported and are ignored", sorted(kwargs))
                max_ctx = self.max_length - max_gen
                if max_ctx < 1:
                    raise ValueError(
                        f"max_gen_toks {max_gen} leaves no room for a prompt in max_length {self.max_length}: "
                        "build with a larger max_seq_len"
                    )
                prompts = [self.tok_encode(c)[-max_ctx:] for c in contexts]
                for context, kw, text in zip(contexts, all_kwargs, self._generate(prompts, max_gen, temperature, top_p, until)):
                    text = postprocess_generated_text(text, until, None)
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, kw), text)
                bar.update(len(batch))
        return order.get_original(results)

    def _generate(self, prompts: list[list[int]], max_gen: int, temperature: float, top_p: float, until: list[str]) -> list[str]:
        """The decoded generations (stop tokens excluded), stopped once every row holds a stop string.

        The stop decision depends only on the tokens, which are the same on every rank, so all
        ranks leave the loop at the same step."""
        tokens: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stop_tokens = set(self.tok.stop_tokens)
        seed = self.seed if temperature > 0 else None
        for step in self.llama.stream(prompts, max_gen, temperature=temperature, top_p=top_p, seed=seed):
            for t in step:
                if done[t.index]:  # its text is final up to the stop string; other rows go on
                    continue
                if t.token not in stop_tokens:
                    tokens[t.index].append(t.token)
                    text = self.tok_decode(tokens[t.index])
                    done[t.index] = any(u and u in text for u in until)
                done[t.index] = done[t.index] or t.finished
            if all(done):
                break
        return [self.tok_decode(t) for t in tokens]

    def get_model_info(self) -> dict:
        p = self.llama.model.params
        n_params = sum(x.numel() for x in self.llama.model.parameters())
        return {
            "model_num_parameters": n_params,  # this rank's share under tensor parallelism
            "model_dtype": str(self.llama.model.output.weight.dtype),
            "model_dim": p.dim,
            "model_n_layers": p.n_layers,
            "max_length": self.max_length,
        }


def task_manager_for(tasks: Sequence[str], include_path: Sequence[str] = ()):
    """An lm-eval TaskManager that knows the bundled suite, the `include_path` directories and, only
    when a task is not among those, lm-eval's own tasks (indexing those takes tens of seconds).

    Raises lm-eval's "Tasks not found: ..." as a ValueError when a task is in none of them."""
    from lm_eval.tasks import TaskManager

    for p in include_path:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"--include_path {p} is not a directory of task YAML files")
    paths = [str(TASKS_DIR), *map(str, include_path)]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(not manager.match_tasks([t]) for t in tasks):
        manager = TaskManager(include_path=paths)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise ValueError(
            f"Tasks not found: {', '.join(missing)} (list them with `lm-eval ls tasks`; the bundled suite is {SUITE})"
        )
    return manager


def load_tasks(manager, tasks: Sequence[str]) -> list:
    """lm-eval Task and Group objects for `tasks`, datasets loaded: a task whose dataset cannot be
    read or downloaded is a ValueError naming the task and the dataset."""
    loaded = []
    for name in tasks:
        try:
            got = manager.load([name])
        except (OSError, ImportError) as e:  # ConnectionError, hub and datasets "not found" errors
            entry = manager.task_index.get(name)
            dataset = (entry.cfg or {}).get("dataset_path") if entry is not None else None
            raise ValueError(
                f"task {name}: cannot load its dataset{f' {dataset}' if dataset else ''} ({type(e).__name__}: {e}); "
                "with no network it must already be in the Hugging Face datasets cache (run it once where "
                f"there is network), or evaluate tasks that need no download, such as the bundled {SUITE}"
            ) from e
        if name in got["groups"]:
            loaded.append(got["groups"][name])
        else:  # a task, or a tag standing for several
            loaded += got["tasks"].values()
    return loaded


def prepare_tasks(tasks: Union[str, Sequence[str]], include_path: Union[str, Sequence[str], None] = None):
    """(TaskManager, loaded Task/Group objects) for comma-separated or listed task names: unknown
    tasks and datasets that cannot be loaded are ValueErrors, raised before any model is loaded."""
    names = _names(tasks)
    if not names:
        raise ValueError(f"no tasks given: pass --tasks, e.g. --tasks {SUITE}")
    manager = task_manager_for(names, _names(include_path))
    return manager, load_tasks(manager, names)


def _names(value: Union[str, Sequence[str], None]) -> list[str]:
    """"a,b", ["a", "b"] or ("a,b", "c") (as fire passes them) -> ["a", "b", ...]."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [n.strip() for item in items for n in str(item).split(",") if n.strip()]


def evaluate(
    lm: LlamaLM,
    tasks: Union[str, Sequence[str]] = SUITE,
    include_path: Union[str, Sequence[str], None] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    log_samples: bool = False,
    output_path: Optional[str] = None,
    model_name: str = "llama",
    bootstrap_iters: int = 100000,
    prepared: Optional[tuple] = None,
) -> Optional[dict]:
    """Run lm-eval's `simple_evaluate` on `lm`; on rank 0 return lm-eval's results (and write them,
    with the samples when log_samples, under output_path as lm-eval's CLI does); None elsewhere.

    prepared: what prepare_tasks returned for `tasks` (then tasks and include_path are not read again).
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    manager, objs = prepared or prepare_tasks(tasks, include_path)
    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    results = simple_evaluate(
        model=lm,
        model_args=f"pretrained={model_name}",
        tasks=objs,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        evaluation_tracker=tracker,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
    )
    if results is not None and tracker is not None:
        write_results(tracker, results, log_samples)
    return results


def write_results(tracker, results: dict, log_samples: bool) -> None:
    """lm-eval's results_<date>.json and, with log_samples, samples_<task>_<date>.jsonl files, written
    by its EvaluationTracker exactly as `lm_eval --output_path` writes them."""
    samples = results.pop("samples", None) if log_samples else None
    tracker.save_results_aggregated(results=results, samples=samples)
    if getattr(tracker, "date_id", None) is None or not list(Path(tracker.output_path).rglob(f"*{tracker.date_id}.json")):
        # the tracker logs a failed write and carries on; a lost result is an error here
        raise FileNotFoundError(f"lm-eval could not write its results under {tracker.output_path}: check that it is writable")
    if samples:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    if samples is not None:
        results["samples"] = samples


def check_tokenizer(ckpt_dir: Optional[str], tokenizer_path: Optional[str]) -> None:
    """A tokenizer other than the checkpoint's own tokenizer.model (when it has one) is refused:
    scores under the wrong tokenizer are silently meaningless. (Llama.build checks the size.)"""
    if ckpt_dir is None or tokenizer_path is None:
        return
    own, given = Path(ckpt_dir) / "tokenizer.model", Path(tokenizer_path)
    if own.is_file() and given.is_file() and own.resolve() != given.resolve() and own.read_bytes() != given.read_bytes():
        raise ValueError(
            f"tokenizer {tokenizer_path} is not the tokenizer of {ckpt_dir} ({own} differs): "
            "pass the checkpoint's own tokenizer.model, or leave --tokenizer_path out to use it"
        )


def _quiet_lm_eval() -> None:
    """No lm-eval logs or progress bars on this process. Under tensor parallelism every rank tells
    lm-eval it is rank 0 (each must run every request), so lm-eval would draw on all of them; its
    bars pass `disable=` themselves, hence the override of tqdm's own default."""
    import tqdm as tqdm_module

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    init = tqdm_module.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    tqdm_module.tqdm.__init__ = quiet_init


def cli(
    tasks: Union[str, Sequence[str]] = SUITE,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    include_path: Union[str, Sequence[str], None] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 8,
    max_seq_len: int = 2048,
    max_gen_toks: int = 256,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    output_path: Optional[str] = None,
    log_samples: bool = False,
    seed: int = 1234,
    bootstrap_iters: int = 100000,
) -> None:
    """Evaluate a checkpoint with lm-evaluation-harness; print lm-eval's table (rank 0).

    Args:
        tasks: lm-eval task, group or tag names, comma-separated (default: the bundled suite,
            which needs no download).
        ckpt_dir, tokenizer_path: the Meta-format checkpoint (default: the bundled demo model).
        include_path: extra directories of task YAML files (the bundled suite is always included).
        num_fewshot: few-shot examples per request (default: each task's own).
        limit: evaluate only the first N documents of each task (a fraction if below 1).
        batch_size: sequences per forward pass.
        max_seq_len: the longest window in tokens (longer requests keep their last tokens).
        max_gen_toks: new tokens for generation tasks that do not set their own.
        device, dtype: where and in what precision to run (see Llama.build).
        quantize: int8 | int4 | fp8 weights, passed to Llama.build only when given.
        output_path: directory (or .json file) for lm-eval's results file, and samples files with
            --log_samples, in lm-eval's own format.
        log_samples: also write every request, response and per-sample score.
        seed: sampling seed of generation tasks that sample.
        bootstrap_iters: lm-eval's bootstrap iterations for standard errors (0: none).
    """
    import sys

    from lm_eval.utils import make_table

    from llama.launch import build_generator

    rank0 = distributed.rank_from_env() == 0
    if not rank0:
        _quiet_lm_eval()
    if output_path is not None and Path(output_path).is_file() and Path(output_path).suffix != ".json":
        raise ValueError(f"--output_path {output_path} is a file: pass a directory, or a .json file name")
    check_tokenizer(ckpt_dir, tokenizer_path)
    prepared = prepare_tasks(tasks, include_path)
    build = {"quantize": quantize} if quantize is not None else {}
    llama = build_generator(
        ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=batch_size, device=device, dtype=dtype, **build
    )
    lm = LlamaLM(llama, batch_size=batch_size, max_gen_toks=max_gen_toks, seed=seed)
    results = evaluate(
        lm,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        output_path=output_path,
        model_name=ckpt_dir or "llama-demo",
        bootstrap_iters=bootstrap_iters,
        prepared=prepared,
    )
    if results is not None and rank0:
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        sys.stdout.flush()
    distributed.shutdown()


def main() -> None:
    """Console entry point (llama-eval)."""
    from llama.cli import run

    run(cli)


if __name__ == "__main__":
    main()
