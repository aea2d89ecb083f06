"""Argument helpers shared by `fleetserve`'s command modules."""

from __future__ import annotations

import argparse
import enum
import os
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from fleetserve import constants
from fleetserve.config import describe_validation_error


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    skip: tuple[str, ...] = (),
    choices: dict[str, list[str]] | None = None,
) -> None:
    """One flag per field of a settings model; the field's description is the help text.

    ``choices`` gives the allowed values of fields that take a registered name.
    """
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        annotation = field.annotation
        options: dict[str, Any] = {"dest": name, "help": field.description or ""}
        flags = ["--" + name.replace("_", "-")]
        if field.is_required():
            options["required"] = True
        else:
            options["default"] = (
                argparse.SUPPRESS
            )  # pydantic applies (and --help shows) the default
            if field.default_factory is None:
                options["help"] += f" (default: {field.default})"
        if annotation is bool:
            options["action"] = "store_true"
            options["help"] = field.description or ""
        elif typing.get_origin(annotation) is list:
            # aliases -> repeatable --alias (or --aliases), nodes -> --node (or --nodes)
            plural = "--" + name.replace("_", "-")
            singular = plural[:-2] if plural.endswith("ses") else plural[:-1]
            flags = [singular, plural]
            options["action"] = "append"
            options["metavar"] = singular[2:].upper()
        else:
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            base = args[0] if isinstance(annotation, types.UnionType) and args else annotation
            options["type"] = base if base in (int, float) else str
            if isinstance(base, type) and issubclass(base, enum.Enum):
                options["choices"] = [member.value for member in base]
        if choices and name in choices:
            options["choices"] = choices[name]
        parser.add_argument(*flags, **options)


def add_controller_url(parser: argparse.ArgumentParser, purpose: str) -> None:
    """``--controller-url`` for commands that talk to a controller."""
    parser.add_argument(
        "--controller-url",
        default=f"http://{constants.DEFAULT_HOST}:{constants.DEFAULT_CONTROLLER_PORT}",
        help=f"{purpose} (default: %(default)s).",
    )


def settings_from(model: type[BaseModel], args: argparse.Namespace, **extra: Any) -> Any:
    values = {k: v for k, v in vars(args).items() if k in model.model_fields}
    values.update(extra)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        sys.exit(f"fleetserve: invalid settings:\n{describe_validation_error(exc)}")


def add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--url`` and ``--api-key`` for commands that are clients of an OpenAI endpoint."""
    parser.add_argument(
        "--url",
        default=f"http://{constants.DEFAULT_HOST}:{constants.DEFAULT_GATEWAY_PORT}/v1",
        help="Base URL of the OpenAI API (default: %(default)s).",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("FLEETSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="API key (default: $FLEETSERVE_API_KEY or $OPENAI_API_KEY).",
    )
