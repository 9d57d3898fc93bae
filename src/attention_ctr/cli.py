"""Project CLI: Kedro's own `run`, with input errors printed as one line instead of a traceback.

Kedro picks up a `cli` group in `<package>.cli` ahead of its built-in commands, and
`python -m attention_ctr` uses the `run` found here too.
"""

from __future__ import annotations

import functools
import os

import click
from kedro.framework.cli.project import run as kedro_run

from attention_ctr.errors import InputError

TRACEBACK_VARIABLE = "ATTENTION_CTR_TRACEBACK"


def _input_error(exc: BaseException) -> InputError | None:
    """The InputError behind `exc` (itself or what it was raised from), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _one_line_input_errors(callback):
    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except Exception as exc:
            error = _input_error(exc)
            if error is None or os.environ.get(TRACEBACK_VARIABLE):
                raise
            click.secho(f"Error: {error}", fg="red", err=True)
            click.echo(
                "This is a problem with the input, not a bug: see docs/when_a_run_fails.md "
                f"(set {TRACEBACK_VARIABLE}=1 for the traceback).",
                err=True,
            )
            raise SystemExit(1) from None

    return wrapper


run = click.Command(
    name="run",
    params=kedro_run.params,
    callback=_one_line_input_errors(kedro_run.callback),
    help=kedro_run.help,
    short_help=kedro_run.short_help,
)


@click.group(name="attention_ctr")
def cli() -> None:
    """Commands of the attention_ctr project."""


cli.add_command(run)
