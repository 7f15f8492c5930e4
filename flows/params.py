"""Flow parameters: one pydantic model per flow, the same model as Prefect's form and as
the command line's flags.

- :class:`FlowParams` is the base of every flow's parameter model (``CleanParams``,
  ``ScoreParams``…): every field has a ``description`` and, where one makes sense (not a
  training run's labels), a default; unknown names and bad values are refused
  (``extra="forbid"``), so a value typed in the Prefect UI, given to ``prefect deployment
  run --param`` or passed from Python is validated before the flow starts, and the error
  names the field.
- :func:`params_flow` is ``@prefect.flow`` for a flow whose one parameter is
  ``params: <Model> = <Model>()``. Prefect's UI then shows the model as a validated form
  (the deployment's ``parameter_openapi_schema``). Python callers pass the model
  (``clean(CleanParams(storage=uri))``), a dict (``clean(params={...})``) or its fields
  as keywords (``clean(storage=uri, shard_size=40)``); Prefect validates all three the
  same way.
- :func:`add_arguments` / :func:`parse_params`: ``--<field>`` flags from the model
  (underscores as dashes; bools as ``--x/--no-x``; a ``Literal`` as choices; a list as a
  repeatable or multi-value flag), parsed back into the model. A field annotated with
  :class:`Flag` keeps a flag name of its own (``--import-site``), is positional, or is
  left off the command line. A flag not given takes the model's default. A bad value is
  one line naming the flag (a :class:`~carflow.errors.UserError`: exit code 2 through
  :func:`flows.entry.entry_point`).
"""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from prefect import Flow
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticUndefined

from carflow.errors import UserError
from flows.engine import prompt_heartbeat_stop


class FlowParams(BaseModel):
    """Base of the flows' parameter models: unknown fields are refused, values are
    immutable (a model is a safe default), and every field carries a description."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line, when not as ``--<field-name>``:
    ``name`` (``"--import-site"``; a name without dashes is positional), ``action``
    (``"append"``: a repeatable flag, where a list field is otherwise one flag with several
    values), ``metavar``, ``cli=False`` (not on the command line: set by the flow's ``main``
    or only from the UI)."""

    name: str | None = None
    action: str | None = None
    metavar: str | None = None
    cli: bool = True


def storage_field() -> Any:
    """The ``storage`` field every flow has."""
    return Field(None, description="storage URI (s3://bucket/prefix) or local path (default: the storage settings)")


def refresh_field(what: str) -> Any:
    """The ``refresh`` field of a stage that keeps its shards in the storage."""
    return Field(False, description=f"recompute this stage even where its shards are stored ({what} again and "
                                    "overwrite the stored shards)")


P = typing.TypeVar("P", bound=argparse.ArgumentParser)


class UsageError(UserError):
    """A bad command line: one line naming the flag."""


# ---------------------------------------------------------------------------------------
# the flow
# ---------------------------------------------------------------------------------------
def _params_model(fn: Callable[..., Any]) -> type[BaseModel]:
    hints = typing.get_type_hints(fn)
    model = hints.get("params")
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{fn.__qualname__}: a params flow takes `params: <a pydantic model>`")
    return model


class ParamsFlow(Flow):  # type: ignore[type-arg]
    """A Prefect flow whose one parameter is ``params``, a pydantic model; a call may also
    give the model's fields as keywords (``clean(storage=uri)``), handed to Prefect as
    ``params={...}`` so that Prefect validates them like a value from the UI."""

    @property
    def params_model(self) -> type[BaseModel]:
        return _params_model(self.fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        prompt_heartbeat_stop()  # the call returns when the run ends, not up to 1 s later
        own = inspect.signature(self.fn).parameters
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in self.params_model.model_fields and k not in own}
        if fields:
            if args or "params" in kwargs:
                raise TypeError(f"{self.name}: pass either params or its fields, not both")
            kwargs["params"] = fields
        return super().__call__(*args, **kwargs)

    def with_options(self, *args: Any, **kwargs: Any) -> Any:
        new = super().with_options(*args, **kwargs)
        new.__class__ = type(self)  # Prefect builds a plain Flow
        return new


def params_flow(**options: Any) -> Callable[[Callable[..., Any]], ParamsFlow]:
    """``@prefect.flow(**options)`` for ``def f(params: Model = Model(), ...)``, as a
    :class:`ParamsFlow`."""

    def wrap(fn: Callable[..., Any]) -> ParamsFlow:
        _params_model(fn)  # a flow without a model fails at import
        return ParamsFlow(fn=fn, **options)

    return wrap


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (a :class:`UsageError`) instead of
    the usage text and ``SystemExit(2)``."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{self.prog}: {message} (`{self.prog} --help` lists the flags)")


def make_parser(prog: str, description: str | None = None, model: type[BaseModel] | None = None) -> Parser:
    """A :class:`Parser` with ``model``'s flags (:func:`add_arguments`)."""
    p = Parser(prog=prog, description=inspect.cleandoc(description or "") or None,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(p, model) if model is not None else p


def _flag(field: Any) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def _inner(annotation: Any) -> Any:
    """``X`` of ``X | None`` (a union of several types: ``str``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def flag_name(model: type[BaseModel], name: str) -> str:
    """The command-line name of field ``name``: ``--shard-size``, or its :class:`Flag`."""
    flag = _flag(model.model_fields[name])
    return flag.name or "--" + name.replace("_", "-")


def add_arguments(p: P, model: type[BaseModel], *, dest_prefix: str = "") -> P:
    """A flag per field of ``model`` on ``p`` (``dest`` = ``dest_prefix`` + the field name).
    Flags not given are left out of the namespace (``argparse.SUPPRESS``), so the model's
    default applies, and a parent parser's flag of the same name is not overwritten."""
    for name, field in model.model_fields.items():
        flag = _flag(field)
        if not flag.cli:
            continue
        kind = _inner(field.annotation)
        help_ = field.description or ""
        if field.default not in (None, PydanticUndefined) and not isinstance(field.default, bool):
            help_ += f" (default: {field.default})"
        cli = flag.name or "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"help": help_, "default": argparse.SUPPRESS}
        if cli.startswith("-"):
            kw["dest"] = dest_prefix + name
        else:  # positional: argparse takes the name as dest
            cli = dest_prefix + name
            kw["metavar"] = flag.name
        if field.is_required() and cli.startswith("-"):
            kw["required"] = True
        if flag.metavar:
            kw["metavar"] = flag.metavar
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kw["choices"] = [str(c) for c in typing.get_args(kind)]
        else:
            kw.setdefault("metavar", cli.lstrip("-").replace("-", "_").upper())
            if typing.get_origin(kind) in (list, tuple, set):
                kw["action"] = flag.action or "extend"
                kw["nargs"] = "*" if kw["action"] == "extend" else None
        if flag.action and "action" not in kw:
            kw["action"] = flag.action
        p.add_argument(cli, **{k: v for k, v in kw.items() if v is not None})
    return p


def parse_params(model: type[BaseModel], args: argparse.Namespace | dict[str, Any], *,
                 dest_prefix: str = "", **fixed: Any) -> Any:
    """The model from the flags that were given (+ ``fixed`` values set by ``main``); a
    bad value is a :class:`UsageError` naming the flag."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    values = {name: given[dest_prefix + name] for name in model.model_fields if dest_prefix + name in given}
    try:
        return model(**values, **fixed)
    except ValidationError as exc:
        raise UsageError(validation_line(exc, model)) from None


def validation_line(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """A pydantic error as one line, each bad field named by its flag."""
    parts = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        where = flag_name(model, name) if model is not None and name in model.model_fields else ".".join(
            map(str, err["loc"]))
        parts.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)

