"""`fleetserve key new|hash`: API keys for the gateway."""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any

import yaml

from fleetserve.errors import ConfigError
from gateway.settings import ApiKey, hash_key


def cmd_key_new(args: argparse.Namespace) -> int:
    key = "sk-fs-" + secrets.token_urlsafe(32)
    entry = ApiKey(
        name=args.name,
        key_sha256=hash_key(key),
        models=args.models,
        rpm=args.rpm,
        tpm=args.tpm,
    )
    print(f"API key (shown once, store it now): {key}\n")
    print("Add this entry to the gateway's keys file (or gateway.keys in the cluster file):")
    entries = {"keys": [entry.model_dump(mode="json", exclude_none=True)]}
    print(yaml.safe_dump(entries, sort_keys=False), end="")
    return 0


def cmd_key_hash(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        raise ConfigError('no key on standard input (`printf %s "$KEY" | fleetserve key hash`)')
    entry = ApiKey(
        name=args.name, key_sha256=hash_key(key), models=args.models, rpm=args.rpm, tpm=args.tpm
    )
    entries = {"keys": [entry.model_dump(mode="json", exclude_none=True)]}
    print(yaml.safe_dump(entries, sort_keys=False), end="")
    return 0


def _limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="Who holds the key.")
    parser.add_argument(
        "--model", dest="models", action="append", help="A model it may use (repeat; default: all)."
    )
    parser.add_argument("--rpm", type=int, help="Requests per minute (default: no limit).")
    parser.add_argument("--tpm", type=int, help="Tokens per minute (default: no limit).")


def register(sub: Any) -> None:
    key = sub.add_parser("key", help="API keys for the gateway.")
    key_sub = key.add_subparsers(dest="key_command", required=True, metavar="KEY_COMMAND")
    key_new = key_sub.add_parser(
        "new",
        help="Make a new API key; prints it once, and the entry (its hash) for the keys file.",
    )
    _limits(key_new)
    key_new.set_defaults(func=cmd_key_new)
    key_hash = key_sub.add_parser(
        "hash",
        help="Read a key you have from standard input (never a command line, where ps shows "
        'it) and print a keys file holding its hash: `printf %%s "$KEY" | fleetserve key hash '
        "--name NAME > keys.yaml`.",
    )
    _limits(key_hash)
    key_hash.set_defaults(func=cmd_key_hash)
