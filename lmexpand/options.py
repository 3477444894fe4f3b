"""The commands' building blocks: options built from the typed configs' fields (a surgery
method's config, TrainConfig), so a command and a recipe validate against one model; a
command class that shows a stage function's usage mistakes as click shows its own; and one
that builds its options on first use."""

from __future__ import annotations

import types
import typing

import click

from lmexpand.errors import UsageError
from lmexpand.validation import flag_name


def option_for_field(name: str, field) -> click.Option:
    """``--name`` for a pydantic field: a bool as --name/--no-name, a Literal as a choice, a
    list of ints as I,J,...; the default in the help; None when not given (the config's
    default then applies)."""
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1
    base = args[0] if is_optional else annotation
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    if isinstance(default, list):
        default = ",".join(map(str, default)) or None
    if isinstance(default, dict):
        default = None
    help_text = (field.description or "") + ("  [required]" if field.is_required() else
                                             "" if default is None else f"  [default: {default}]")
    flag = flag_name(name)
    if base is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=help_text)
    if typing.get_origin(base) is typing.Literal:
        return click.Option([flag, name], type=click.Choice([str(c) for c in typing.get_args(base)]), default=None, help=help_text)
    if typing.get_origin(base) is list and typing.get_args(base) == (int,):
        def split(ctx, param, value):
            if value is None:
                return None
            try:
                return [int(x) for x in value.split(",") if x.strip()]
            except ValueError:
                raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 3,7,11") from None

        return click.Option([flag, name], type=str, default=None, callback=split, help=help_text, metavar="I,J,...")
    click_type = {int: click.INT, float: click.FLOAT, str: click.STRING}.get(base, click.STRING)
    return click.Option([flag, name], type=click_type, default=None, help=help_text)


class Command(click.Command):
    """Shows a usage mistake found by a stage function as click shows its own."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            if e.param_hint:
                raise click.BadParameter(str(e), ctx, param_hint=e.param_hint) from None
            raise click.UsageError(str(e), ctx) from None


class Group(click.Group):
    command_class = Command


class LazyParamsCommand(Command):
    """Builds part of its options on first use, so `lmexpand --help` stays light."""

    def __init__(self, *args, params_factory, **kwargs):
        super().__init__(*args, **kwargs)
        self._params_factory = params_factory

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._params_factory is not None:
            self.params.extend(self._params_factory())
            self._params_factory = None
        return super().get_params(ctx)
