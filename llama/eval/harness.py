"""lm-evaluation-harness's tasks and results around our LM: the bundled suite and lm-eval's own
tasks, loaded before any model; `simple_evaluate`; lm-eval's own output files."""
from pathlib import Path
from typing import Optional, Sequence, Union

from llama.eval.lm import LlamaLM
from llama.eval.tasks import SUITE, TASKS_DIR


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
