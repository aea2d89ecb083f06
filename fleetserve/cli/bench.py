"""`fleetserve bench`: a serving benchmark against any OpenAI-compatible endpoint.

For each load level (a number of concurrent clients, or a request rate with
Poisson arrivals) it sends streamed chat completions and measures what a user
feels: time to first token (TTFT), time per output token after it (TPOT),
end-to-end latency, throughput in requests and output tokens per second, and
errors. Results: a table, a JSON file with every request, and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetserve.cli.args import add_endpoint_arguments
from fleetserve.cli.openai_stream import stream_event
from fleetserve.cli.status import make_console

# Synthetic prompts are words from this list: about one token per word for BPE tokenizers.
_WORDS = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "has",
    "had",
    "not",
    "but",
    "what",
    "all",
    "when",
    "can",
    "there",
    "been",
    "one",
    "would",
    "will",
    "if",
    "more",
    "who",
    "their",
    "they",
    "about",
    "so",
    "time",
    "into",
    "only",
    "other",
    "new",
    "some",
    "could",
    "these",
    "two",
    "may",
    "first",
    "then",
    "do",
    "any",
    "like",
    "my",
    "now",
    "over",
)


@dataclass
class Prompt:
    messages: list[dict[str, str]]
    max_tokens: int


@dataclass
class RequestResult:
    start_s: float  # since the level started
    latency_s: float
    ttft_s: float | None
    output_tokens: int
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class LevelResult:
    mode: str  # "concurrency" or "rate"
    level: float
    duration_s: float
    requests: int
    errors: int
    request_per_s: float
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    latency_ms: dict[str, float]
    results: list[RequestResult] = field(repr=False)


def _length(mean: int, spread: float, rng: random.Random) -> int:
    return max(1, round(mean * rng.uniform(1 - spread, 1 + spread)))


def synthetic_prompts(
    count: int, input_len: int, output_len: int, spread: float, seed: int
) -> list[Prompt]:
    """Prompts of about ``input_len`` words and answers of ``output_len`` tokens, +-spread."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words = " ".join(rng.choice(_WORDS) for _ in range(_length(input_len, spread, rng)))
        prompts.append(
            Prompt([{"role": "user", "content": words}], _length(output_len, spread, rng))
        )
    return prompts


def file_prompts(path: Path, count: int, output_len: int) -> list[Prompt]:
    """JSONL: ``{"prompt": "..."}`` or ``{"messages": [...]}``, optional ``max_tokens``."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
        except (ValueError, KeyError, AttributeError):
            raise ValueError(
                f'{path}:{number}: expected {{"prompt": ...}} or {{"messages": [...]}}'
            ) from None
        prompts.append(Prompt(messages, int(item.get("max_tokens", output_len))))
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return [prompts[i % len(prompts)] for i in range(count)]


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "p99": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98]}


class Bench:
    def __init__(
        self, base_url: str, model: str, api_key: str | None, extra_body: dict[str, Any]
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.extra_body = extra_body

    async def request(self, http: httpx.AsyncClient, prompt: Prompt, t0: float) -> RequestResult:
        body = {
            "model": self.model,
            "messages": prompt.messages,
            "max_tokens": prompt.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.extra_body,
        }
        start = time.perf_counter()
        ttft: float | None = None
        chunks = 0
        usage_tokens: int | None = None
        try:
            async with http.stream("POST", self.url, json=body, headers=self.headers) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:200]
                    raise RuntimeError(f"HTTP {response.status_code}: {detail}")
                async for line in response.aiter_lines():
                    data = stream_event(line)
                    if data is None:
                        continue
                    if data.get("usage"):
                        usage_tokens = data["usage"].get("completion_tokens")
                    for choice in data.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            chunks += 1
                            if ttft is None:
                                ttft = time.perf_counter() - start
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            return RequestResult(
                start - t0, time.perf_counter() - start, ttft, 0, f"{type(exc).__name__}: {exc}"
            )
        tokens = usage_tokens if usage_tokens is not None else chunks
        return RequestResult(start - t0, time.perf_counter() - start, ttft, tokens)

    async def level(
        self, mode: str, level: float, prompts: list[Prompt], progress: Progress
    ) -> LevelResult:
        label = f"{mode} {level:g}"
        task = progress.add_task(label, total=len(prompts))
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        timeout = httpx.Timeout(600.0, connect=10.0)
        results: list[RequestResult] = []
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
            t0 = time.perf_counter()

            async def run(prompt: Prompt) -> None:
                results.append(await self.request(http, prompt, t0))
                progress.advance(task)

            if mode == "concurrency":
                queue = list(reversed(prompts))

                async def client() -> None:
                    while queue:
                        await run(queue.pop())

                await asyncio.gather(*(client() for _ in range(int(level))))
            else:  # Poisson arrivals at `level` requests per second
                rng = random.Random(0)
                pending = []
                for prompt in prompts:
                    pending.append(asyncio.create_task(run(prompt)))
                    await asyncio.sleep(rng.expovariate(level))
                await asyncio.gather(*pending)
            duration = time.perf_counter() - t0
        ok = [r for r in results if r.error is None]
        return LevelResult(
            mode=mode,
            level=level,
            duration_s=duration,
            requests=len(results),
            errors=len(results) - len(ok),
            request_per_s=len(ok) / duration,
            output_tokens_per_s=sum(r.output_tokens for r in ok) / duration,
            ttft_ms=_percentiles([1000 * r.ttft_s for r in ok if r.ttft_s is not None]),
            tpot_ms=_percentiles([1000 * t for r in ok if (t := r.tpot_s) is not None]),
            latency_ms=_percentiles([1000 * r.latency_s for r in ok]),
            results=sorted(results, key=lambda r: r.start_s),
        )


def results_table(levels: list[LevelResult], title: str) -> Table:
    table = Table(title=title)
    columns = ("load", "requests", "errors", "req/s", "out tok/s")
    for column in (*columns, "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "latency p50/p99 ms"):
        table.add_column(column, justify="right", no_wrap=True)

    def three(p: dict[str, float]) -> str:
        return f"{p['p50']:.0f} / {p['p90']:.0f} / {p['p99']:.0f}"

    for r in levels:
        table.add_row(
            f"{r.mode} {r.level:g}",
            str(r.requests),
            str(r.errors),
            f"{r.request_per_s:.1f}",
            f"{r.output_tokens_per_s:.0f}",
            three(r.ttft_ms),
            f"{r.tpot_ms['p50']:.1f} / {r.tpot_ms['p90']:.1f} / {r.tpot_ms['p99']:.1f}",
            f"{r.latency_ms['p50']:.0f} / {r.latency_ms['p99']:.0f}",
        )
    return table


def plot(levels: list[LevelResult], path: Path, title: str) -> None:
    """Latency, TTFT and TPOT against achieved throughput, one point per load level."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font cache notes are noise
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    throughput = [r.request_per_s for r in levels]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, name in zip(
        axes, ("latency_ms", "ttft_ms", "tpot_ms"), ("latency", "TTFT", "TPOT"), strict=True
    ):
        for pct in ("p50", "p90", "p99"):
            ax.plot(throughput, [getattr(r, key)[pct] for r in levels], marker="o", label=pct)
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_bench(
    bench: Bench,
    mode: str,
    levels: list[float],
    prompts: list[Prompt],
    out_dir: Path,
    console: Console,
) -> int:
    title = f"{bench.model} at {bench.url.removesuffix('/chat/completions')}"
    results: list[LevelResult] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        for level in levels:
            results.append(asyncio.run(bench.level(mode, level, prompts, progress)))
    console.print(results_table(results, title))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"bench-{stamp}.json"
    report = {
        "model": bench.model,
        "url": bench.url,
        "mode": mode,
        "levels": [asdict(r) for r in results],
    }
    json_path.write_text(json.dumps(report, indent=1))
    console.print(f"results: {json_path}")
    try:
        plot(results, out_dir / f"bench-{stamp}.png", title)
        console.print(f"plot: {out_dir / f'bench-{stamp}.png'}")
    except ImportError:
        console.print("no plot: matplotlib is not installed (pip install 'fleetserve[bench]')")
    errors = sum(r.errors for r in results)
    if errors:
        first = next(x.error for r in results for x in r.results if x.error)
        console.print(f"[red]{errors} request(s) failed[/red]; the first: {first}", highlight=False)
    return 1 if errors == sum(r.requests for r in results) else 0


# -- the `fleetserve bench` command ---------------------------------------------------


def _levels(text: str) -> list[float]:
    try:
        levels = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not levels or any(level <= 0 for level in levels):
        raise argparse.ArgumentTypeError("levels must be positive")
    return levels


def _first_model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        data = httpx.get(f"{url.rstrip('/')}/models", headers=headers, timeout=10).json()["data"]
        return str(data[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        sys.exit(f"fleetserve: cannot list the models at {url} ({exc}); give --model")


def cmd_bench(args: argparse.Namespace) -> int:
    model = args.model or _first_model(args.url, args.api_key)
    if args.prompts:
        try:
            prompts = file_prompts(args.prompts, args.num_prompts, args.output_len)
        except (OSError, ValueError) as exc:
            sys.exit(f"fleetserve bench: {exc}")
    else:
        prompts = synthetic_prompts(
            args.num_prompts, args.input_len, args.output_len, args.len_spread, args.seed
        )
    extra = {"ignore_eos": True} if args.ignore_eos else {}
    if args.request_rate:
        mode, levels = "rate", args.request_rate
    else:
        mode, levels = "concurrency", args.concurrency or [1.0, 4.0, 16.0]
    bench = Bench(args.url, model, args.api_key, extra)
    return run_bench(bench, mode, levels, prompts, args.out_dir, make_console())


def register(sub: Any) -> None:
    """Add `bench` to the CLI's subcommands."""
    bench = sub.add_parser(
        "bench",
        help="Benchmark an OpenAI-compatible endpoint (fleetserve's or another).",
        description="Streamed chat completions at each load level; prints a table (req/s, "
        "output tokens/s, TTFT, TPOT and latency percentiles, errors) and writes a JSON "
        "file with every request and PNG plots (latency against throughput).",
    )
    bench.add_argument("--model", help="Model to ask (default: the first the endpoint lists).")
    add_endpoint_arguments(bench)
    load = bench.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=_levels,
        help="Closed loop: concurrent clients per level, e.g. 1,4,16 (the default).",
    )
    load.add_argument(
        "--request-rate",
        type=_levels,
        help="Open loop: requests per second per level (Poisson arrivals), e.g. 2,8,32.",
    )
    bench.add_argument("--num-prompts", type=int, default=64, help="Requests per level (64).")
    bench.add_argument(
        "--prompts", type=Path, help='JSONL file of {"prompt": ...} or {"messages": [...]}.'
    )
    bench.add_argument("--input-len", type=int, default=128, help="Synthetic prompt words (128).")
    bench.add_argument("--output-len", type=int, default=128, help="max_tokens (128).")
    bench.add_argument(
        "--len-spread",
        type=float,
        default=0.5,
        help="Lengths are uniform within +-this fraction (0.5; 0: fixed).",
    )
    bench.add_argument("--seed", type=int, default=0, help="Seed of the synthetic prompts.")
    bench.add_argument(
        "--ignore-eos",
        action="store_true",
        help="Ask vLLM to generate max_tokens every time (its `ignore_eos` extension).",
    )
    bench.add_argument(
        "--out-dir", type=Path, default=Path("bench-results"), help="Where JSON and PNG go."
    )
    bench.set_defaults(func=cmd_bench)
