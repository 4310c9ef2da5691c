"""Strict command lines on top of fire: every flag is checked against the function's signature before
the function runs, so a misspelled flag is refused in one line instead of being ignored (fire hands
unknown flags back as leftovers and applies them to the result, after the whole job has run).

A leaf: the standard library, fire and llama.distributed only (what a CLI builds lives in llama.launch).
"""
import difflib
import inspect
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import fire

from llama import distributed

HELP = ("-h", "--help")
# fire's chaining separator: what follows it would be applied to the function's result
FIRE_SEPARATOR = "-"
Commands = Union[Callable, Mapping[str, Callable]]


class UsageError(Exception):
    """A command line that does not fit the command: reported in one line, exit status 2."""


def split_list(value: Union[str, int, tuple, list]) -> list[str]:
    """A comma-separated list as fire hands it over: "2,3", (2, 3), 2 or "(2,3)"; items stripped."""
    items = value if isinstance(value, (tuple, list)) else str(value).strip("()[] ").split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def int_list(value: Union[str, int, tuple, list]) -> list[int]:
    """A comma-separated list of integers (split_list)."""
    return [int(v) for v in split_list(value)]


def log_to_stdout(*names: str) -> None:
    """Show the INFO logs of the named library loggers on stdout, as a script's own progress lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in names:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)


def run(
    commands: Commands,
    argv: Optional[Sequence[str]] = None,
    name: Optional[str] = None,
    forwards: Sequence[Callable] = (),
    errors: tuple[type[Exception], ...] = (),
) -> None:
    """Run a function (or one of a dict of sub-commands, {"to_hf": f, "from_hf": g}) on the command
    line, after checking it: an unknown flag, a surplus argument or a missing one is refused in one
    line on stderr (from rank 0) with exit status 2, before the function is called. `-h`/`--help`
    anywhere shows fire's help and exits 0. The function's return value is not printed.

    Bad input found by the function itself (a missing file, a shape or count that does not fit:
    FileNotFoundError, ValueError, TypeError) is one `error:` line and exit status 1, instead of a
    traceback from every rank. Under torchrun the line also goes to the launcher's error file, so
    that the failure summary the launcher prints last shows it as the root cause.

    forwards: for a function that takes **kwargs, the functions it hands them to; their parameters
    are accepted too. Without it such a function accepts any flag (fire's rule).
    errors: more exception types to report as one `error:` line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    name = name or os.path.basename(sys.argv[0])
    try:
        command = parse_command_line(commands, args, forwards)
    except UsageError as e:
        _fail(f"error: {e}", status=2)
        return
    fire_args = command.prefix + (["--", "--help"] if command.help else command.args)
    try:
        fire.Fire(commands, command=fire_args, name=name, serialize=lambda _: None)
    except (FileNotFoundError, ValueError, TypeError, *errors) as e:
        _fail(f"error: {e}", status=1)


@dataclass
class Command:
    """What parse_command_line found: the sub-command (prefix), the function's own arguments, and
    whether help was asked for."""

    fn: Optional[Callable]
    prefix: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    help: bool = False


def parse_command_line(commands: Commands, args: Sequence[str], forwards: Sequence[Callable] = ()) -> Command:
    """Check `args` against `commands` the way fire will read them; raise UsageError on anything
    fire would leave unconsumed or refuse."""
    args, fire_flags = _split_fire_flags(list(args))
    help_asked = any(a in HELP for a in args + fire_flags)
    prefix: list[str] = []
    fn: Optional[Callable] = None
    if isinstance(commands, Mapping):
        if not args or args[0] in HELP:
            if help_asked:
                return Command(None, help=True)
            raise UsageError(f"a command is needed: one of {', '.join(commands)} (--help for more)")
        if args[0] not in commands:
            listed = f"(commands: {', '.join(commands)})"
            if _is_flag(args[0]):
                raise UsageError(f"{args[0]} before the command: the command comes first {listed}")
            raise UsageError(f"unknown command {args[0]}{_suggest(args[0], list(commands))} {listed}")
        prefix, fn, args = [args[0]], commands[args[0]], args[1:]
    else:
        fn = commands
    where = f" for {prefix[0]}" if prefix else ""
    if help_asked:  # the flags beside it must still exist; arguments may be left out
        check_args(fn, [a for a in args if a not in HELP], forwards, where, flags_only=True)
        return Command(fn, prefix=prefix, help=True)
    check_args(fn, args, forwards, where)
    return Command(fn, prefix=prefix, args=args)


def check_args(
    fn: Callable, args: Sequence[str], forwards: Sequence[Callable] = (), where: str = "", flags_only: bool = False
) -> None:
    """Raise UsageError unless fire would consume every one of `args` calling `fn`: each flag names
    a parameter (--name value, --name=value, --name alone or --noname for booleans, --na-me for
    --na_me, -n for the one parameter starting with n), each positional fills a parameter not set
    by a flag, and no required parameter is left without a value. flags_only: check the flags' names only."""
    spec = _Spec.of(fn, forwards)
    given: set[str] = set()
    positionals: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == FIRE_SEPARATOR:
            raise UsageError(f"unexpected argument {arg}")
        if not _is_flag(arg):
            positionals.append(arg)
            i += 1
            continue
        key = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
        bool_syntax = "=" not in arg and (i + 1 == len(args) or _is_flag(args[i + 1]))
        param = spec.keyword_for(key, bool_syntax)
        if param is None:
            raise UsageError(f"unknown flag {arg.split('=', 1)[0]}{where}{_suggest(key, spec.names, dashes=True)}")
        given.add(param)
        i += 1 if "=" in arg or bool_syntax else 2
    if flags_only:
        return
    free = [p for p in spec.positional if p not in given]
    if len(positionals) > len(free) and not spec.varargs:
        extra = positionals[len(free):]
        raise UsageError(f"unexpected argument{'s' if len(extra) > 1 else ''} {' '.join(extra)}{where}"
                         f" (it takes {_describe(spec.positional)})")
    given.update(free[: len(positionals)])
    missing = [p for p in spec.required if p not in given]
    if missing:
        raise UsageError(f"missing {', '.join(p.upper() for p in missing)}{where}"
                         f" (as {'an argument' if len(missing) == 1 else 'arguments'} or --{missing[0]})")


@dataclass
class _Spec:
    """The parameters fire can fill in a function: by position (positional), by flag (names)."""

    positional: list[str]
    names: list[str]
    required: list[str]
    varargs: bool
    varkw: bool

    @classmethod
    def of(cls, fn: Callable, forwards: Sequence[Callable] = ()) -> "_Spec":
        params = list(inspect.signature(fn).parameters.values())
        kinds = inspect.Parameter
        positional = [p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        names = positional + [p.name for p in params if p.kind == kinds.KEYWORD_ONLY]
        required = [p.name for p in params if p.default is kinds.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
        varkw = any(p.kind == kinds.VAR_KEYWORD for p in params)
        for other in forwards:
            names += [n for n in _Spec.of(other).names if n not in names]
        return cls(positional, names, required, any(p.kind == kinds.VAR_POSITIONAL for p in params), varkw and not forwards)

    def keyword_for(self, key: str, bool_syntax: bool) -> Optional[str]:
        """The parameter a flag's key sets (fire's rules), or None for an unknown flag."""
        if key in self.names or self.varkw:
            return key
        if bool_syntax and key.startswith("no") and key[2:] in self.names:
            return key[2:]
        if len(key) == 1:
            matches = [n for n in self.names if n[0] == key]
            if len(matches) > 1:
                raise UsageError(f"-{key} is ambiguous: {', '.join('--' + m for m in matches)}")
            if matches:
                return matches[0]
        return None


def _split_fire_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(the command's arguments, fire's own flags after a `--`); only help is taken from fire's."""
    if "--" not in args:
        return args, []
    at = args.index("--")
    own, flags = args[:at], args[at + 1:]
    unsupported = [f for f in flags if f not in HELP + ("-v", "--verbose")]
    if unsupported:
        raise UsageError(f"unsupported argument after --: {unsupported[0]} (only --help is read there)")
    return own, flags


def _is_flag(arg: str) -> bool:
    """fire's rule: a leading hyphen, except a negative number."""
    return arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg) is not None


def _suggest(key: str, names: Sequence[str], dashes: bool = False) -> str:
    close = difflib.get_close_matches(key.lstrip("-"), names, n=1, cutoff=0.6)
    if not close:
        return " (--help lists them)" if dashes else ""
    return f": did you mean {'--' if dashes else ''}{close[0]}?"


def _describe(positional: Sequence[str]) -> str:
    return " ".join(p.upper() for p in positional) if positional else "no positional arguments"


def _fail(line: str, status: int) -> None:
    """`line` on stderr from rank 0 (and to the launcher), then exit with `status`."""
    if distributed.rank_from_env() == 0:
        print(line, file=sys.stderr)
    _tell_launcher(line)
    distributed.shutdown()
    sys.exit(status)


def _tell_launcher(message: str) -> None:
    """Write `message` where torch.distributed.elastic's launcher reads a worker's failure (the file
    named by TORCHELASTIC_ERROR_FILE, in the format of its ErrorHandler); nothing without a launcher."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # the summary prints py_callstack as the "traceback": our one line instead of a Python traceback
    info = {"py_callstack": message, "timestamp": str(int(time.time()))}
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": info}}, f)
    except OSError:
        pass  # the error line is already on stderr
