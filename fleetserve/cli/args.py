"""Settings <-> command lines, and argument helpers shared by `fleetserve`'s commands.

Every process's settings are a pydantic model (controller/, gateway/ and
workers/settings.py). One flag per field, the field's description as its help:
:func:`add_settings_arguments` and :func:`settings_from` read settings from a command
line, and :func:`settings_argv`, their inverse, writes the command line for settings
(what `fleetserve up`, the Ray replicas, the tests and the benchmarks start processes
with).
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from fleetserve import constants, env
from fleetserve.config import ENGINES, ROUTING_POLICIES, describe_validation_error
from fleetserve.errors import ConfigError
from fleetserve.registry import Registered


def registries() -> dict[str, type[Registered]]:
    """The registered names the CLI checks settings against, by validation context key."""
    from gateway.routing import RoutingPolicy
    from workers.engines import Engine

    return {ENGINES: Engine, ROUTING_POLICIES: RoutingPolicy}


def validation_context() -> dict[str, Any]:
    """What pydantic checks engine and policy names against (see fleetserve/config.py)."""
    return {kind: family.registry for kind, family in registries().items()}


#: Fields that take a registered name, and the registry's context key.
_REGISTERED_FIELDS = {"engine": ENGINES, "routing_policy": ROUTING_POLICIES}


def _flags(name: str, field: FieldInfo) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if typing.get_origin(field.annotation) is list:
        # aliases -> repeatable --alias (or --aliases), nodes -> --node (or --nodes)
        return [flag[:-2] if flag.endswith("ses") else flag[:-1], flag]
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return [flag, *typing.cast(list[str], extra.get("cli_aliases", []))]


def add_settings_arguments(
    parser: argparse.ArgumentParser, model: type[BaseModel], skip: Sequence[str] = ()
) -> None:
    """One flag per field of a settings model; the field's description is the help text.

    Fields that take a registered name (engine, routing policy) get its names as choices
    and its default in the help.
    """
    families = registries()
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        annotation = field.annotation
        flags = _flags(name, field)
        options: dict[str, Any] = {"dest": name, "help": field.description or ""}
        if field.is_required():
            options["required"] = True
        else:
            options["default"] = argparse.SUPPRESS  # pydantic applies (and --help shows) it
            if name in _REGISTERED_FIELDS:
                family = families[_REGISTERED_FIELDS[name]]
                options["choices"] = sorted(family.registry)
                options["help"] += f" (default: {family.default_name})"
            elif field.default_factory is None:
                options["help"] += f" (default: {field.default})"
        if annotation is bool:
            options["action"] = "store_true"
            options["help"] = field.description or ""
        elif typing.get_origin(annotation) is list:
            options["action"] = "append"
            options["metavar"] = flags[0][2:].upper()
        else:
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            base = args[0] if isinstance(annotation, types.UnionType) and args else annotation
            options["type"] = base if base in (int, float) else str
            if isinstance(base, type) and issubclass(base, enum.Enum):
                options["choices"] = [member.value for member in base]
        parser.add_argument(*flags, **options)


def settings_from(model: type[BaseModel], args: argparse.Namespace, **extra: Any) -> Any:
    """The settings a parsed command line gives; ConfigError saying what is wrong."""
    values = {k: v for k, v in vars(args).items() if k in model.model_fields}
    values.update(extra)
    try:
        return model.model_validate(values, context=validation_context())
    except ValidationError as exc:
        raise ConfigError(f"invalid settings:\n{describe_validation_error(exc)}") from None


def settings_argv(settings: BaseModel, skip: Sequence[str] = ()) -> list[str]:
    """The flags that give ``settings`` back through :func:`settings_from`; defaults left out."""
    argv: list[str] = []
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if name in skip or value is None or value == field.get_default(call_default_factory=True):
            continue
        flag = _flags(name, field)[0]
        if isinstance(value, bool):
            assert value, f"{name}: a flag can only turn a setting on"
            argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value.value if isinstance(value, enum.Enum) else value)]
    return argv


def add_controller_url(parser: argparse.ArgumentParser, purpose: str) -> None:
    """``--controller-url``, and what to trust it with, for commands that talk to a controller."""
    parser.add_argument(
        "--controller-url",
        default=f"http://{constants.DEFAULT_HOST}:{constants.DEFAULT_CONTROLLER_PORT}",
        help=f"{purpose} (default: %(default)s).",
    )
    parser.add_argument(
        "--cluster-token-file",
        help="File with the cluster token the controller asks for (default: "
        f"${env.CLUSTER_TOKEN}, else the token `fleetserve up` made on this machine).",
    )
    parser.add_argument(
        "--ca-file", help="Trust the controller's certificate when this CA (PEM) signed it."
    )


def add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--url`` and ``--api-key`` for commands that are clients of an OpenAI endpoint."""
    parser.add_argument(
        "--url",
        default=f"http://{constants.DEFAULT_HOST}:{constants.DEFAULT_GATEWAY_PORT}/v1",
        help="Base URL of the OpenAI API (default: %(default)s).",
    )
    parser.add_argument(
        "--api-key",
        default=env.api_key(),
        help=f"API key (default: ${' or $'.join(env.API_KEYS)}).",
    )
