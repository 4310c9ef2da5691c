"""Datasets of the bundled tasks, read from the JSONL files beside this module.

lm-eval hands a task's `dataset_kwargs.data_files` to `datasets.load_dataset` as they are, so a
relative path would resolve against the working directory; the tasks name this function as their
`custom_dataset` instead (lm-eval imports it from the YAML's own directory), and it resolves the
file against its own location, wherever the package is installed. No network, no datasets cache.
"""
import json
from pathlib import Path

import datasets


def load(data_file: str, **_metadata) -> datasets.DatasetDict:
    """The one split, `test`, of a bundled task: `data_file` is relative to this directory.

    lm-eval passes the task's metadata (version, model arguments) as keywords too; they are unused.
    """
    path = Path(__file__).resolve().parent / data_file
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
