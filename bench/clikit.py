"""What every `fedame-bench` command shares, the harness's own and those a method package adds
through the `fedame_bench.commands` entry-point group: the option types, the one-line error
handling, and the run flags methods declare (`Server.run_flags`)."""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from typing import Annotated, Optional

import typer

from bench.errors import UserError
from bench.progress import console

COMMANDS_GROUP = "fedame_bench.commands"

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="YAML config path, or a name in configs/ (default, cifar100, smoke ...)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field: key.sub=value (repeatable)")]
DataDirOpt = Annotated[
    Optional[str], typer.Option("--data-dir", help="Folder holding the dataset files (else FEDAME_DATA_DIR, data.root, ~/.cache)")
]


class FlagError(UserError, ValueError):
    pass


def say_interrupted() -> None:
    console.print("[yellow]interrupted: completed runs and tasks are saved; rerun the same command to resume[/]")


def user_errors(fn):
    """Turn UserErrors into one line on stderr and exit code 2; a Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            say_interrupted()
            raise typer.Exit(130) from None

    return wrapper


def method_flags() -> dict[str, tuple[str, tuple[str, ...]]]:
    """`--NAME` -> (help, config overrides) for every flag a registered method brings to `run`."""
    from bench.api import available_methods

    flags: dict[str, tuple[str, tuple[str, ...]]] = {}
    for cls in available_methods().values():  # methods that share a flag (a variant and its parent) each add their overrides
        for f in cls.run_flags:
            help_, overrides = flags.get(f"--{f.name}", (f.help, ()))
            flags[f"--{f.name}"] = (help_, overrides + tuple(o for o in f.overrides if o not in overrides))
    return flags


def flag_overrides(extra_args: list[str]) -> list[str]:
    """The config overrides the method flags among `extra_args` stand for; anything else is an error."""
    flags = method_flags()
    out: list[str] = []
    for arg in extra_args:
        if arg not in flags:
            known = ", ".join(sorted(flags)) or "none"
            raise FlagError(f"no such option: {arg} (method flags: {known}; see `fedame-bench run --help`)")
        out += flags[arg][1]
    return out


class RunCommand(typer.core.TyperCommand):
    """`run`, whose help lists the flags the registered methods bring (read when help is asked for)."""

    def format_help(self, ctx, formatter) -> None:
        flags = method_flags()
        if flags:
            self.epilog = "Method flags: " + "; ".join(f"{name}: {help_}" for name, (help_, _) in sorted(flags.items()))
        super().format_help(ctx, formatter)


def add_method_commands(app: typer.Typer) -> None:
    """Let every installed method package add its commands (`diagnose`, say) to the app."""
    for ep in entry_points(group=COMMANDS_GROUP):
        ep.load()(app)
