"""The command line a user typed, kept so that run folders and model cards can show it exactly."""

from __future__ import annotations

import shlex
from typing import Any

import click


class RecordingGroup(click.Group):
    """A click group that stores its raw arguments in ``ctx.meta`` before parsing them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["rarechange.argv"] = list(args)
        return super().parse_args(ctx, args)


def command_line(**_: Any) -> str:
    """``rarechange ...`` as invoked (from the shell, or from a CliRunner in tests)."""
    ctx = click.get_current_context(silent=True)
    args = ctx.meta.get("rarechange.argv", []) if ctx is not None else []
    return shlex.join(["rarechange", *args])
