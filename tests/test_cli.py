"""Strict command lines on every CLI (llama/cli.py): the examples, the console entry points, and every
script under scripts/, benchmarks/ and recipes/. A misspelled flag is refused in one line that names
it (and the flag meant) with a non-zero exit, before anything is loaded; every CLI and every command
shown in README.md and docs/*.md answers --help with exit 0.

The --help checks run in one process (tests/workers/cli_help.py); the misspelled flags each in their
own process, several at a time, since what a user sees there (one line, quickly) is the point."""
import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Optional

import pytest

import helpers
from llama import cli

REPO = helpers.REPO
HELP_WORKER = REPO / "tests" / "workers" / "cli_help.py"
SCRIPT_DIRS = ("scripts", "benchmarks", "recipes")
QUICK_S = 10  # a refusal must come before any model is loaded, even on busy cores
SHELL_STOPS = ("|", "||", "&&", ";", "&")
MAIN_BLOCK = re.compile(r"^if __name__ == .__main__.:", re.M)


# ---------------------------------------------------------------------------------------- the CLIs
def entry_points() -> dict[str, str]:
    """Console scripts from pyproject.toml: name -> "module:function"."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def script_files() -> list[Path]:
    """Every file run as a command: the examples and each script with a __main__ block."""
    files = sorted(REPO.glob("example_*.py"))
    for d in SCRIPT_DIRS:
        files += sorted(p for p in (REPO / d).rglob("*.py") if MAIN_BLOCK.search(p.read_text()))
    return files


def all_clis() -> list[dict]:
    """Each CLI as a job for the help worker (without its arguments), with a readable id."""
    clis = [{"id": str(p.relative_to(REPO)), "script": str(p)} for p in script_files()]
    clis += [{"id": name, "entry": target, "name": name} for name, target in entry_points().items()]
    return clis


def command(job: dict, args: list[str]) -> list[str]:
    """The argv that runs `job` with `args` in a fresh interpreter."""
    if "script" in job:
        return [sys.executable, job["script"], *args]
    module, function = job["entry"].split(":")
    code = f"import sys; sys.argv[0] = {job['name']!r}; from {module} import {function}; {function}()"
    return [sys.executable, "-c", code, *args]


def help_runs(jobs: list[dict]) -> list[dict]:
    """Run each job (a CLI with its "args") in the one help worker process."""
    payload = json.dumps([{k: v for k, v in j.items() if k in ("script", "module", "entry", "name", "args")} for j in jobs])
    r = subprocess.run([sys.executable, str(HELP_WORKER)], input=payload, capture_output=True, text=True,
                       cwd=REPO, env=helpers.child_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


# --------------------------------------------------------------------------------- reading help
def help_commands(text: str) -> list[str]:
    """The sub-commands fire's help lists for a dict of commands (empty for a function)."""
    if "COMMANDS" not in text:
        return []
    section = text.split("COMMANDS", 1)[1]
    return re.findall(r"^ {5}(\w+)$", section, flags=re.M)


def help_flags(text: str) -> list[str]:
    """The parameters fire's help lists: flags (--name=NAME) and positional arguments (NAME)."""
    flags = re.findall(r"--([a-z][a-z0-9_]*)", text.split("FLAGS", 1)[1]) if "FLAGS" in text else []
    if "POSITIONAL ARGUMENTS" in text:
        section = text.split("POSITIONAL ARGUMENTS", 1)[1].split("\n\n", 1)[0]
        flags += [n.lower() for n in re.findall(r"^ {4}([A-Z][A-Z0-9_]*)$", section, flags=re.M)]
    return [f for f in flags if f not in ("help",)]


def misspell(name: str) -> str:
    """`name` with its middle character doubled: close enough for a suggestion, and no flag."""
    k = len(name) // 2
    return name[:k] + name[k] + name[k:]


# ------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def clis() -> list[dict]:
    """Every CLI with its --help output ("help"), its sub-commands ("commands", for a dict of them, and
    the first one's help) and the outcome of a misspelled flag ("refusal": rc, out, seconds, "wrong",
    the flag given, and "meant", the real flag it misspells), all run in the help worker."""
    clis = all_clis()
    for c, r in zip(clis, help_runs([{**c, "args": ["--help"]} for c in clis])):
        c["help"], c["commands"] = r, help_commands(r["out"])
    subs = [c for c in clis if c["commands"]]
    for c, r in zip(subs, help_runs([{**c, "args": [c["commands"][0], "--help"]} for c in subs]) if subs else []):
        c["command_help"] = r
    for c in clis:
        flags = help_flags((c.get("command_help") or c["help"])["out"])
        c["meant"] = max(flags, key=len) if flags else None
        c["wrong"] = misspell(c["meant"]) if c["meant"] else "no_such_flag_here"
        c["refusal_args"] = [*c["commands"][:1], f"--{c['wrong']}", "1"]
    for c, r in zip(clis, help_runs([{**c, "args": c["refusal_args"]} for c in clis])):
        c["refusal"] = r
    return clis


def test_every_cli_answers_help(clis):
    bad = [f"{c['id']}: exit {c['help']['rc']}\n{c['help']['out'][-1500:]}" for c in clis if c["help"]["rc"] != 0]
    bad += [f"{c['id']} {c['commands'][0]}: exit {c['command_help']['rc']}\n{c['command_help']['out'][-1500:]}"
            for c in clis if c["commands"] and c["command_help"]["rc"] != 0]
    assert not bad, "\n\n".join(bad)
    assert {"llama-chat", "llama-convert", "llama-serve", "llama-eval"} <= {c["id"] for c in clis}


def refusal_problems(rc: int, out: str, seconds: float, wrong: str, meant: Optional[str]) -> list[str]:
    """What is wrong with the answer to a misspelled flag: it must be one line naming --wrong (and
    --meant), a non-zero exit, and quick."""
    lines = out.strip().splitlines()
    problems = [] if rc != 0 else ["exit status 0"]
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines")
    elif f"--{wrong}" not in lines[0] or (meant and f"did you mean --{meant}?" not in lines[0]):
        problems.append(f"the line does not name --{wrong}" + (f" and --{meant}" if meant else ""))
    if seconds > QUICK_S:
        problems.append(f"took {seconds:.1f}s")
    return problems


def test_every_cli_refuses_a_misspelled_flag_in_one_line_before_loading(clis):
    bad = []
    for c in clis:
        r = c["refusal"]
        problems = refusal_problems(r["rc"], r["out"], r["seconds"], c["wrong"], c["meant"])
        if problems:
            bad.append(f"{c['id']} {' '.join(c['refusal_args'])}: {'; '.join(problems)}\n{r['out'][-1500:]}")
    assert not bad, "\n\n".join(bad)


def _in_own_process(c: dict, tmp: Path) -> list[str]:
    """The misspelled flag of `c` in a fresh interpreter: what a user sees, and the CPU time it took
    (not the wall time: other processes share the cores)."""
    name = re.sub(r"\W", "_", c["id"])
    out_path, err_path = tmp / f"{name}.out", tmp / f"{name}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(command(c, c["refusal_args"]), cwd=REPO, env=helpers.child_env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        killer = threading.Timer(120, proc.kill)
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = out_path.read_text(), err_path.read_text()
    problems = refusal_problems(proc.returncode, out + err, usage.ru_utime + usage.ru_stime, c["wrong"], c["meant"])
    return [f"{c['id']}: {'; '.join(problems)}\n{err[-1500:]}"] if problems else []


def test_entry_points_and_examples_refuse_in_their_own_process(clis, tmp_path):
    """The same, each in a fresh process, for the console entry points and the examples (the rest
    import the same modules): one line on stderr, nothing on stdout, a few seconds of CPU."""
    chosen = [c for c in clis if "entry" in c or c["id"].startswith("example_")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        bad = [p for problems in pool.map(lambda c: _in_own_process(c, tmp_path), chosen) for p in problems]
    assert not bad, "\n\n".join(bad)


# --------------------------------------------------------------------------- documented commands
def documented_commands() -> list[tuple[str, dict]]:
    """(where, job) for each command line in README.md and docs/**/*.md that runs one of ours:
    `python X.py ...`, `python -m llama...`, `torchrun ... X.py ...`, `llama-X ...`."""
    found = []
    entries = entry_points()
    for md in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        if not md.is_file():
            continue
        lines = md.read_text().splitlines()
        for i, line in enumerate(lines):
            text = re.sub(r"^\s*(\$ )?", "", line)
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1] + " " + lines[i].strip()
            job = _job_for(text, entries)
            if job is not None:
                job["shows_refusal"] = "did you mean" in "\n".join(lines[i: i + 6])
                found.append((f"{md.relative_to(REPO)}:{i + 1}: {text}", job))
    return found


def _job_for(text: str, entries: dict) -> Optional[dict]:
    if not re.match(r"(\w+=\S+ )*(python3?|torchrun|llama-[\w-]+)\b", text):
        return None
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return None
    while words and re.match(r"^\w+=", words[0]):  # VAR=value before the command
        words.pop(0)
    cut = next((k for k, w in enumerate(words) if w in SHELL_STOPS or w.startswith((">", "<", "2>"))), len(words))
    words = words[:cut]
    if not words:
        return None
    if words[0] in entries:
        return {"entry": entries[words[0]], "name": words[0], "args": words[1:]}
    if words[0] in ("python", "python3") and words[1:2] == ["-m"] and len(words) > 2:
        path = REPO / words[2].replace(".", "/")  # a module of ours (a package of ours lacking __main__ fails)
        return {"module": words[2], "args": words[3:]} if path.with_suffix(".py").is_file() or path.is_dir() else None
    k = next((k for k, w in enumerate(words) if w.endswith(".py")), None)
    if k is None or not (REPO / words[k]).is_file():
        return None
    return {"script": str(REPO / words[k]), "args": words[k + 1:]}


def test_every_documented_command_answers_help():
    """Each command as written, with --help added: exit 0 (a documented flag that does not exist is
    refused, unless the page shows that refusal on purpose)."""
    found = documented_commands()
    if not found:
        pytest.skip("no commands in README.md or docs/")
    results = help_runs([{**job, "args": [*job["args"], "--help"]} for _, job in found])
    bad = [f"{where}\n  exit {r['rc']}: {r['out'].strip()[-800:]}" for (where, job), r in zip(found, results)
           if r["rc"] != 0 and not (job["shows_refusal"] and r["rc"] == 2)]
    assert not bad, "\n\n".join(bad)


# -------------------------------------------------------------------------------- cli.run itself
def _f(ckpt_dir: str, out_dir: str = "o", max_seq_len: int = 8, compile: bool = False, *, seed: int = 1):
    pass


def _g(a: str, **kwargs):
    pass


@pytest.mark.parametrize("args", [
    ["c"], ["c", "o", "4"], ["--ckpt_dir", "c"], ["--ckpt_dir=c", "--compile"], ["c", "--nocompile"],
    ["c", "--max-seq-len", "3"], ["c", "-m", "3"], ["c", "--compile", "--seed", "2"], ["c", "--seed=-1"],
    ["c", "--max_seq_len", "-1"],
])
def test_accepted_command_lines(args):
    cli.check_args(_f, args)


@pytest.mark.parametrize("args, message", [
    (["c", "--max_seq_lenght", "3"], "unknown flag --max_seq_lenght: did you mean --max_seq_len?"),
    (["c", "--max_seq_lenght=3"], "unknown flag --max_seq_lenght: did you mean --max_seq_len?"),
    (["c", "o", "4", "True", "extra"], "unexpected argument extra"),
    (["c", "-"], "unexpected argument -"),
    ([], "missing CKPT_DIR"),
    (["--seed", "2"], "missing CKPT_DIR"),
    (["c", "--zzz"], "unknown flag --zzz (--help lists them)"),
    (["c", "-q"], "unknown flag -q"),
])
def test_refused_command_lines(args, message):
    with pytest.raises(cli.UsageError, match=re.escape(message)):
        cli.check_args(_f, args)


FIRE_SAMPLES = [
    ["c"], ["c", "o", "4"], ["--ckpt_dir", "c"], ["--ckpt_dir=c", "--compile"], ["c", "--nocompile"], ["c", "-m", "3"],
    ["c", "--compile", "x"], ["c", "--max-seq-len", "3"], ["c", "--seed=-1"], ["c", "--max_seq_len", "-1"],
    ["c", "--max_seq_lenght", "3"], ["c", "o", "4", "True", "extra"], ["c", "--zzz"], ["c", "-q"], ["c", "--nozzz"],
    ["--seed", "2"], [], ["c", "-abc"], ["c", "--seed", "1", "--seed", "2"], ["c", "--noseed"], ["c", "-s", "3"],
]


@pytest.mark.parametrize("args", FIRE_SAMPLES)
def test_check_args_agrees_with_what_fire_consumes(args):
    """check_args passes exactly where fire's own parser would consume every argument (so nothing
    is left over to apply to the result) and find every required one."""
    from fire import core, decorators

    parse = core._MakeParseFn(_f, decorators.GetMetadata(_f))
    try:
        fire_ok = not parse(list(args))[2]
    except core.FireError:
        fire_ok = False
    try:
        cli.check_args(_f, args)
        ours_ok = True
    except cli.UsageError:
        ours_ok = False
    assert ours_ok == fire_ok


def test_kwargs_are_checked_against_what_they_are_forwarded_to():
    cli.check_args(_g, ["a", "--anything", "1"])  # fire's rule without `forwards`
    cli.check_args(_g, ["a", "--seed", "1"], forwards=[_f])
    with pytest.raises(cli.UsageError, match="did you mean --seed"):
        cli.check_args(_g, ["a", "--sed", "1"], forwards=[_f])


def test_sub_commands_and_help():
    commands = {"to_hf": _f, "from_hf": _g}
    assert cli.parse_command_line(commands, ["to_hf", "c", "--compile"]).prefix == ["to_hf"]
    assert cli.parse_command_line(commands, ["--help"]).help
    assert cli.parse_command_line(commands, ["to_hf", "--help"]).help  # a missing argument is fine with help
    assert cli.parse_command_line(commands, ["to_hf", "-h", "--", "--help"]).help
    for args, message in [(["tohf"], "unknown command tohf: did you mean to_hf?"), ([], "a command is needed"),
                          (["--compile", "to_hf"], "--compile before the command"),
                          (["to_hf", "c", "--complie"], "unknown flag --complie for to_hf: did you mean --compile?"),
                          (["to_hf", "--complie", "--help"], "unknown flag --complie"),
                          (["to_hf", "c", "--", "--trace"], "unsupported argument after --: --trace")]:
        with pytest.raises(cli.UsageError, match=re.escape(message)):
            cli.parse_command_line(commands, args)


def test_run_refuses_before_calling_and_never_prints_the_result(capsys):
    called = []

    def f(n: int = 1):
        called.append(n)
        return "a result fire would print"

    with pytest.raises(SystemExit) as e:
        cli.run(f, ["--nn", "2"], name="f")
    assert e.value.code == 2 and not called
    assert capsys.readouterr().err.strip() == "error: unknown flag --nn: did you mean --n?"
    cli.run(f, ["--n", "3"], name="f")
    assert called == [3] and capsys.readouterr().out == ""
