"""`fleetserve chat`: talk to a served model in the terminal, answers streamed as they come.

Commands: ``/model NAME`` switches model (the history stays), ``/models`` lists
them, ``/clear`` forgets the history, ``/exit`` (or Ctrl-D) leaves. Ctrl-C
stops an answer being generated and returns to the prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

import httpx
from rich.console import Console

from fleetserve.cli.args import add_endpoint_arguments
from fleetserve.cli.openai_stream import stream_event
from fleetserve.cli.status import make_console

HELP = "/model NAME switches, /models lists, /clear forgets, /exit leaves; Ctrl-C stops an answer"


class Chat:
    def __init__(
        self,
        url: str,
        model: str | None,
        api_key: str | None,
        console: Console,
        temperature: float,
        max_tokens: int,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600.0)
        self.console = console
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.history: list[dict[str, str]] = []
        self.model = model or ""

    def models(self) -> list[str]:
        response = self.http.get("/models")
        response.raise_for_status()
        return [m["id"] for m in response.json()["data"]]

    def switch(self, name: str) -> None:
        available = self.models()
        if name not in available:
            self.console.print(f"[red]no model {name!r}[/red]; served: {', '.join(available)}")
            return
        self.model = name
        self.console.print(f"now talking to {name}")

    def ask(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        body = {
            "model": self.model,
            "messages": self.history,
            "stream": True,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        parts: list[str] = []
        start = time.perf_counter()
        first: float | None = None
        stopped = False
        try:
            with self.http.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    self._show_error(response.read())
                    self.history.pop()
                    return
                for piece in _content(response.iter_lines()):
                    if first is None:
                        first = time.perf_counter() - start
                    parts.append(piece)
                    self.console.out(piece, end="", highlight=False)
                    self.console.file.flush()
        except KeyboardInterrupt:  # closing the stream makes the engine stop generating
            stopped = True
        except (httpx.HTTPError, RuntimeError) as exc:
            self.console.print(f"\n[red]{exc}[/red]")
        answer = "".join(parts)
        self.history.append({"role": "assistant", "content": answer})
        elapsed = time.perf_counter() - start
        rate = len(parts) / (elapsed - first) if first is not None and elapsed > first else 0.0
        note = "stopped; " if stopped else ""
        ttft = f"first token {1000 * first:.0f} ms, " if first is not None else ""
        self.console.print(f"\n[dim]({note}{ttft}{len(parts)} chunks, {rate:.1f}/s)[/dim]")

    def _show_error(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode(errors="replace")[:300]
        self.console.print(f"[red]{message}[/red]", highlight=False)

    def run(self) -> int:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        try:
            if not self.model:
                self.model = self.models()[0]
        except (httpx.HTTPError, IndexError, KeyError, ValueError) as exc:
            self.console.print(f"[red]cannot list models at {self.http.base_url}: {exc}[/red]")
            return 1
        self.console.print(f"chatting with [bold]{self.model}[/bold] at {self.http.base_url}")
        self.console.print(f"[dim]{HELP}[/dim]")
        while True:
            try:
                line = input(f"{self.model}> ").strip()
            except EOFError:
                self.console.print()
                return 0
            except KeyboardInterrupt:
                self.console.print()
                continue
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return 0
            try:
                self._command(line)
            except httpx.HTTPError as exc:
                self.console.print(f"[red]{exc}[/red]")

    def _command(self, line: str) -> None:
        if line == "/models":
            self.console.print(", ".join(self.models()))
        elif line.startswith("/model"):
            name = line.removeprefix("/model").strip()
            if name:
                self.switch(name)
            else:
                self.console.print(f"talking to {self.model}; /model NAME to switch")
        elif line == "/clear":
            self.history.clear()
            self.console.print("history cleared")
        elif line.startswith("/"):
            self.console.print(HELP)
        else:
            self.ask(line)


def _content(lines: Any) -> Any:
    """The text pieces of an OpenAI chat stream; RuntimeError for an error event."""
    for line in lines:
        data = stream_event(line)
        if data is None:
            continue
        for choice in data.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                yield piece


def cmd_chat(args: argparse.Namespace) -> int:
    chat = Chat(
        args.url, args.model, args.api_key, make_console(), args.temperature, args.max_tokens
    )
    return chat.run()


def register(sub: Any) -> None:
    """Add `chat` to the CLI's subcommands."""
    chat = sub.add_parser(
        "chat",
        help="Talk to a model in the terminal (streaming; /model to switch).",
        description="Chat in the terminal. /model NAME switches model, /models lists them, "
        "/clear forgets the history, /exit or Ctrl-D leaves; Ctrl-C stops an answer.",
    )
    chat.add_argument("--model", help="Model to talk to (default: the first served).")
    chat.add_argument("--temperature", type=float, default=0.7, help="Default: 0.7.")
    chat.add_argument("--max-tokens", type=int, default=1024, help="Per answer (1024).")
    add_endpoint_arguments(chat)
    chat.set_defaults(func=cmd_chat)
