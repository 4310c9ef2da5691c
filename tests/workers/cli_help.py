"""Run many command lines in this one process (torch imported once), for tests/test_cli.py: reads a
JSON list of jobs on stdin, writes a JSON list of {"rc", "out" (stdout and stderr), "seconds"}.

A job is {"script": path, "args": [...]} (run as `python path args`: its own directory first on
sys.path, as Python does for a script), {"module": name, "args": [...]} (`python -m name args`) or
{"entry": "module:function", "name": ..., "args": [...]} (a console entry point). A script that hands itself over with os.execv (a forwarder in scripts/) runs
its target here instead."""
import contextlib
import importlib
import io
import json
import os
import runpy
import signal
import sys
import time
import traceback


JOB_TIMEOUT_S = 60  # a CLI that ignores a bad flag may start its real work: stop it, as a failure


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"still running after {JOB_TIMEOUT_S}s: the command did not stop at its arguments")


class _Exec(Exception):
    def __init__(self, argv: list):
        self.argv = argv


def _execv(path, argv):
    raise _Exec(list(argv))


def _run_script(path: str, args: list) -> None:
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except _Exec as e:  # argv: [python, target, *args]
        _run_script(e.argv[1], e.argv[2:])


def run_job(job: dict) -> dict:
    out = io.StringIO()
    rc = 0
    start = time.perf_counter()
    path0 = sys.path[0]
    signal.alarm(JOB_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if "script" in job:
                _run_script(job["script"], job["args"])
            elif "module" in job:  # python -m module args
                sys.argv = [job["module"], *job["args"]]
                runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            else:
                module, function = job["entry"].split(":")
                sys.argv = [job["name"], *job["args"]]
                getattr(importlib.import_module(module), function)()
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 -- reported to the test, which names the command
        rc = 1
        out.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        sys.path[0] = path0
    return {"rc": rc, "out": out.getvalue(), "seconds": time.perf_counter() - start}


def main() -> None:
    os.execv = _execv
    signal.signal(signal.SIGALRM, _alarm)
    jobs = json.load(sys.stdin)
    real_stdout = sys.stdout
    results = [run_job(job) for job in jobs]
    json.dump(results, real_stdout)


if __name__ == "__main__":
    main()
