"""Serving load benchmark: ``vllm-cmasd bench-serve --out DIR``.

Starts real ``vllm serve`` processes on loopback, one method at a time (plain
decoding, vLLM's draft-model speculation at fixed k, the CM-ASD controller,
the paper's window, R-Stitch: the in-process benchmark's methods), and loads
each with vLLM's own benchmark client (``vllm bench serve``: the benchmark's
prompts as its ``custom`` JSONL dataset, streaming chat completions, greedy)
at several concurrency levels. vLLM's tool measures (TTFT / TPOT / ITL /
E2EL percentiles, throughput, the server's speculative-decoding counters)
and writes its result JSON per method and level; this module starts the
servers, picks the levels and writes ``DIR/serve.json`` (settings, per level
vLLM's figures and the generated texts) and ``DIR/serve.md`` (the table).

:class:`VllmServer` (start, wait for ``/health``, stop) is also what
``tests/test_serve.py`` uses.

Engine settings come from :func:`vllm_cmasd.engines.llm_kwargs`, turned into
``vllm serve`` flags, so the servers run like the in-process benchmark's engines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_cmasd.bench.intervals import speedup_interval
from vllm_cmasd.bench.runner import MethodSpec, cmasd, cmasd_budget, cmasd_eagle3, cmasd_exact, rstitch, turns
from vllm_cmasd.metrics import CONTROLLER_TOTALS

HOST = "127.0.0.1"

# ---------------------------------------------------------------------------
# Starting and stopping a real `vllm serve`


def free_port() -> int:
    """A TCP port free on loopback now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def serve_command(model: str, flags: list[str]) -> list[str]:
    """``vllm serve MODEL FLAGS`` as ``vllm-cmasd serve``, run with this interpreter.

    Same CLI and flags as ``vllm serve``; it also runs on vLLM's CPU build,
    where the ``vllm`` script dies before parsing (see ``vllm_cmasd.cli.serve``).
    """
    return [sys.executable, "-m", "vllm_cmasd.cli", "serve", model, *flags]


def engine_flags(kwargs: dict[str, Any]) -> list[str]:
    """``vllm.LLM`` keyword arguments (as from ``llm_kwargs``, minus ``model``) as CLI flags."""
    flags: list[str] = []
    for key, value in kwargs.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if key == "disable_log_stats":
                if value:
                    flags.append(flag)
            else:
                flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


class VllmServer:
    """One ``vllm serve`` process on 127.0.0.1 (its own process group), logging to a file."""

    def __init__(self, model: str | Path, flags: list[str] | None = None, *, name: str = "server",
                 log_dir: str | Path | None = None, env: dict[str, str] | None = None):
        self.model = str(model)
        self.name = name
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.command = serve_command(self.model, [*(flags or []), "--host", HOST, "--port", str(self.port)])
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="vllm-serve-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}.stdout.log"
        self.stderr_path = log_dir / f"{name}.stderr.log"
        self.env = dict(os.environ if env is None else env)
        # A real server runs its engine in a separate process (the tests' in-process
        # setting must not leak into it).
        self.env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.proc: subprocess.Popen | None = None

    # -- lifecycle
    def start(self) -> "VllmServer":
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 240.0) -> "VllmServer":
        """Poll ``/health`` until 200; raise (with the log's tail) on exit or timeout."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: vllm serve exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.name}: /health not ready after {timeout:.0f} s\n{self.log_tail()}")

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status, or None (and the server stopped) if it is still running after ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (vLLM shuts its engine down), then SIGKILL to the whole process group."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group's id is the server's pid
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever the server left behind in its group (engine core, workers).
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "VllmServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        text = self.stdout_path.read_text(errors="replace") + self.stderr()
        return text[-chars:]

    def metrics(self) -> dict[str, float]:
        """``/metrics`` summed per series name + labels: {'name{k="v",...}': value}."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10.0).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k not in ("model_name", "engine"))
                key = f"{sample.name}{{{labels}}}" if labels else sample.name
                out[key] = out.get(key, 0.0) + sample.value
        return out


def metric_total(metrics: dict[str, float], name: str) -> float:
    """Sum of every series of ``name`` (all label values)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


# ---------------------------------------------------------------------------
# Methods


def serve_methods(k: int, k_max: int, rstitch_entropy: float) -> dict[str, MethodSpec]:
    """What ``--methods`` may name: the in-process benchmark's methods (same settings)."""
    return {
        "ar": MethodSpec("ar"),
        "draft_model": MethodSpec("draft_model", k),
        "cmasd": cmasd(k_max),
        "cmasd_exact": cmasd_exact(k_max),
        "cmasd_budget": cmasd_budget(k_max),
        "rstitch": rstitch(k_max, rstitch_entropy),
        "eagle3": MethodSpec("eagle3", k),
        "cmasd_eagle3": cmasd_eagle3(k_max),
    }


def server_overrides(max_model_len: int, kv_cache_gib: float | None, block_size: int | None = None) -> dict[str, Any]:
    """Engine settings beside llm_kwargs' defaults (CPU: a fixed KV-cache pool)."""
    from vllm_cmasd.engines import on_cpu

    overrides: dict[str, Any] = {"max_model_len": max_model_len}
    if kv_cache_gib and on_cpu():
        overrides["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    if block_size is not None:
        overrides["block_size"] = block_size
    return overrides


# ---------------------------------------------------------------------------
# Load: vLLM's own benchmark client (``vllm bench serve``)


def write_dataset(prompts: list[str], max_tokens: int, path: Path) -> Path:
    """The prompts as a ``vllm bench serve --dataset-name custom`` JSONL file."""
    path.write_text("".join(json.dumps({"prompt": p, "output_tokens": max_tokens}) + "\n" for p in prompts))
    return path


def warm_up(server: VllmServer, prompt: str, *, max_tokens: int, timeout: float) -> None:
    """What ``vllm bench serve`` would send before its measured requests (a test
    request and one warm-up: the first prompt, greedy), sent here instead, before
    the server's counters are read: they then count the measured requests alone
    (vLLM's client reads its own spec-decode counters after its warm-up, not ours)."""
    import httpx

    body = {"model": server.model, "messages": [{"role": "user", "content": prompt}],
            "max_completion_tokens": max_tokens, "temperature": 0.0}
    for _ in range(2):
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)
        if reply.status_code != 200:
            raise RuntimeError(f"{server.name}: warm-up request failed ({reply.status_code}): {reply.text[:500]}\n"
                               f"{server.log_tail()}")


def vllm_bench_serve(server: VllmServer, dataset: Path, *, concurrency: int, num_requests: int, max_tokens: int,
                     result_dir: Path, result_filename: str) -> dict[str, Any]:
    """One load level through vLLM's ``vllm bench serve`` (its CLI arguments,
    run in this process): streaming chat completions, greedy, at most
    ``concurrency`` in flight, no test or warm-up request (:func:`warm_up` sent
    them). Returns vLLM's result JSON (also saved as
    ``result_dir/result_filename``): TTFT / TPOT / ITL / E2EL percentiles,
    throughputs, and the server's speculative-decoding counters."""
    from vllm_cmasd.cli import answer_vllm_metadata_lookups

    answer_vllm_metadata_lookups()  # vLLM's CPU build
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai-chat", "--base-url", server.url, "--endpoint", "/v1/chat/completions",
        "--model", server.model, "--dataset-name", "custom", "--dataset-path", str(dataset),
        "--disable-shuffle", "--skip-chat-template", "--num-prompts", str(num_requests), "--max-concurrency", str(concurrency),
        "--custom-output-len", str(max_tokens), "--temperature", "0", "--num-warmups", "0", "--ready-check-timeout-sec", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", result_filename,
        "--disable-tqdm",
    ])
    return main(args)


# ---------------------------------------------------------------------------
# The benchmark


@dataclass
class ServeBenchConfig:
    target: str
    draft: str
    methods: list[MethodSpec]
    eagle3: str | None = None  # the EAGLE-3 head of eagle3 / cmasd_eagle3
    concurrencies: list[int] = field(default_factory=lambda: [1, 8, 32])
    requests_per_concurrency: int = 2  # requests at level c = this * c ...
    # ... and at least this many: at one stream, 2 requests made a level's figure
    # one prompt's (a translation the draft does badly weighed half).
    min_requests: int = 8
    max_tokens: int = 64
    num_prompts: int = 24
    max_model_len: int = 2048
    kv_cache_gib: float | None = 2.0
    # None: vLLM's own (128 tokens on CPU, 16 on GPU). An EAGLE engine's prefix
    # hit drops its last matched block, which at 128 costs most of a short prompt.
    block_size: int | None = None
    startup_timeout: float = 600.0
    request_timeout: float = 600.0
    # Every method's server runs once a round, in turn (reversed every other
    # round, so a drift of the machine's speed favours no method): one level
    # run once per method moved 10-20% between runs on the 2-core machines.
    rounds: int = 1


def bench_prompts(n: int) -> list[str]:
    """The benchmark's fixed prompts, tasks interleaved (summarization, translation, instruction, ...)."""
    from vllm_cmasd.bench.prompts import TASKS, load_prompts

    tasks = load_prompts()["tasks"]
    out: list[str] = []
    for i in range(max(len(tasks[t]) for t in TASKS)):
        for t in TASKS:
            if i < len(tasks[t]):
                out.append(tasks[t][i]["prompt"])
    return out[:n]


CONTROLLER_COUNTERS = tuple(f"vllm:cmasd_{name}_total" for name in CONTROLLER_TOTALS)


def controller_counters(metrics: dict[str, float]) -> dict[str, float]:
    """CM-ASD's own counters in a server's /metrics (what vLLM's client does not read)."""
    return {name.split(":")[1].removesuffix("_total"): metric_total(metrics, name) for name in CONTROLLER_COUNTERS}


def prefix_cache_counts(metrics: dict[str, float]) -> tuple[float, float]:
    """vLLM's prefix-cache (queried, hit) token counters."""
    return metric_total(metrics, "vllm:prefix_cache_queries_total"), metric_total(metrics, "vllm:prefix_cache_hits_total")


def served_block_size(metrics: dict[str, float]) -> int | None:
    """The KV-cache block size the server runs (vLLM's cache_config_info series)."""
    for key in metrics:
        if key.startswith("vllm:cache_config_info{"):
            found = re.search(r'block_size="(\d+)"', key)
            return int(found.group(1)) if found else None
    return None


def cost_fit(metrics: dict[str, float]) -> dict[str, float]:
    """The controller's measured cost fit ({} without a controller)."""
    prefix = 'vllm:cmasd_cost_seconds{'
    return {key.split('term="')[1].split('"')[0]: value for key, value in metrics.items()
            if key.startswith(prefix) and 'term="' in key}


def level_summary(method: MethodSpec, concurrency: int, startup_s: float, result: dict[str, Any]) -> dict[str, Any]:
    """Our table's row, read from vLLM's result JSON."""
    drafts = result.get("spec_decode_num_drafts", 0)
    return {
        "method": method.method, "label": method.label, "concurrency": concurrency, "startup_s": startup_s,
        "requests": result["num_prompts"], "errors": result["failed"],
        "throughput_tok_s": result["output_throughput"], "requests_per_s": result["request_throughput"],
        "ttft_p50_s": result["median_ttft_ms"] / 1e3, "ttft_p99_s": result["p99_ttft_ms"] / 1e3,
        "tpot_p50_s": result["median_tpot_ms"] / 1e3, "itl_p99_s": result["p99_itl_ms"] / 1e3,
        "e2e_p50_s": result["median_e2el_ms"] / 1e3, "e2e_p99_s": result["p99_e2el_ms"] / 1e3,
        "mean_output_tokens": result["total_output_tokens"] / max(result["completed"], 1),
        "mean_draft_length": result.get("spec_decode_draft_tokens", 0) / drafts if drafts else 0.0,
        "mean_acceptance_length": result.get("spec_decode_acceptance_length", 1.0) if drafts else 1.0,
    }


def run_serve_bench(cfg: ServeBenchConfig, out_dir: str | Path, prompts: list[str] | None = None,
                    log=print) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = prompts or bench_prompts(cfg.num_prompts)
    dataset = write_dataset(prompts, cfg.max_tokens, out_dir / "prompts.jsonl")
    overrides = server_overrides(cfg.max_model_len, cfg.kv_cache_gib, cfg.block_size)
    results: list[dict[str, Any]] = []
    started = time.time()
    for round_, method in round_order(cfg.methods, cfg.rounds):
        # The self-draft (specbound) is not offered here.
        flags = engine_flags(method.engine_kwargs(cfg.target, {"draft": cfg.draft, "eagle3": cfg.eagle3}, overrides))
        server = VllmServer(cfg.target, flags, name=method.method, log_dir=out_dir / "logs")
        log(f"[bench-serve] round {round_}, {method.label}: starting vllm serve on {server.url}", flush=True)
        t0 = time.perf_counter()
        server.start()
        try:
            server.wait_ready(cfg.startup_timeout)
            startup_s = time.perf_counter() - t0
            for c in cfg.concurrencies:
                n = max(cfg.requests_per_concurrency * c, cfg.min_requests)
                filename = f"vllm-{method.method}-c{c}" + (f"-r{round_}" if cfg.rounds > 1 else "") + ".json"
                warm_up(server, prompts[0], max_tokens=cfg.max_tokens, timeout=cfg.request_timeout)
                before = server.metrics()
                result = vllm_bench_serve(server, dataset, concurrency=c, num_requests=n, max_tokens=cfg.max_tokens,
                                          result_dir=out_dir, result_filename=filename)
                summary = {**level_summary(method, c, startup_s, result), "round": round_}
                after = server.metrics()
                counted = controller_counters(before)
                summary.update({k: v - counted[k] for k, v in controller_counters(after).items()})
                summary["cost_fit"] = cost_fit(after)  # at the end of the level
                # The requests the server finished between the two reads: the measured ones alone.
                summary["server_requests"] = (metric_total(after, "vllm:request_success_total")
                                              - metric_total(before, "vllm:request_success_total"))
                # An EAGLE engine drops its last matched block (vLLM re-runs it for the
                # head's hidden states): on CPU's 128-token blocks, most of a short prompt.
                (queried, hit), (queried_after, hit_after) = prefix_cache_counts(before), prefix_cache_counts(after)
                summary["prefix_cache_hit_rate"] = (
                    (hit_after - hit) / (queried_after - queried) if queried_after > queried else None
                )
                summary["block_size"] = served_block_size(after)
                results.append({"summary": summary, "vllm_result": filename,
                                "texts": result.get("generated_texts", [])})
                log(f"[bench-serve]   c={c:<3} n={n:<3} {summary['throughput_tok_s']:7.1f} tok/s  "
                    f"e2e p50 {summary['e2e_p50_s']:.2f} s p99 {summary['e2e_p99_s']:.2f} s  "
                    f"ttft p50 {summary['ttft_p50_s']:.2f} s p99 {summary['ttft_p99_s']:.2f} s  "
                    f"errors {summary['errors']}", flush=True)
        finally:
            server.stop()
    record = {
        "settings": {**asdict(cfg), "methods": [m.label for m in cfg.methods], "server_overrides": overrides,
                     "num_prompts_used": len(prompts), "client": "vllm bench serve (vllm.benchmarks.serve)"},
        "machine": machine_info(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": time.time() - started,
        "results": results,
        "speedup_vs_ar": speedups_vs_ar([r["summary"] for r in results]),
    }
    (out_dir / "serve.json").write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / "serve.md").write_text(markdown_table(record))
    return record


def round_order(methods: list[MethodSpec], rounds: int) -> list[tuple[int, MethodSpec]]:
    """(round, method) in the order their servers run: every method once a
    round, the order reversed every other round."""
    return [(r, m) for r in range(rounds) for m in turns(methods, r)]


def speedups_vs_ar(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and level, output tok/s over plain decoding's in the same
    round (servers that ran minutes apart, not a whole run apart): each
    round's ratio, their median and range. Empty without plain decoding."""
    plain = {(s["round"], s["concurrency"]): s["throughput_tok_s"] for s in summaries if s["method"] == "ar"}
    ratios: dict[tuple[str, int], list[float]] = {}
    for s in summaries:
        base = plain.get((s["round"], s["concurrency"]))
        if s["method"] != "ar" and base:
            ratios.setdefault((s["label"], s["concurrency"]), []).append(s["throughput_tok_s"] / base)
    return [{"label": label, "concurrency": c, "ratios": values, "median": statistics.median(values),
             "min": min(values), "max": max(values), "interval": speedup_interval(values)} for (label, c), values in ratios.items()]


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["loadavg_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def markdown_table(record: dict[str, Any]) -> str:
    s = record["settings"]
    lines = [
        "# Serving load benchmark",
        "",
        f"target `{s['target']}`, draft `{s['draft']}`; vLLM's `vllm bench serve` client (its result JSON: "
        f"`vllm-<method>-c<concurrency>.json`), streaming chat completions, greedy, "
        f"max_tokens {s['max_tokens']}, {s['requests_per_concurrency']} x concurrency requests per level "
        f"(at least {s.get('min_requests', 0)}), "
        f"{s['num_prompts_used']} prompts cycled; started {record['started_utc']}, took {record['duration_s']:.0f} s.",
        "",
        "| method | round | concurrency | requests | errors | output tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | e2e p50 s | e2e p99 s | mean draft | accepted/step | steps without a drafter pass | catch-up tokens | of which exploring | drafter s | prefix-cache hits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        m = r["summary"]
        lines.append(
            f"| {m['label']} | {m.get('round', 0)} | {m['concurrency']} | {m['requests']} | {m['errors']} | {m['throughput_tok_s']:.1f} | "
            f"{m['ttft_p50_s']:.2f} | {m['ttft_p99_s']:.2f} | {1e3 * m['tpot_p50_s']:.0f} | "
            f"{m['e2e_p50_s']:.2f} | {m['e2e_p99_s']:.2f} | {m['mean_draft_length']:.2f} | {m['mean_acceptance_length']:.2f} | "
            f"{m['cmasd_skipped_drafter_passes']:.0f} | {m['cmasd_catch_up_tokens']:.0f} | "
            f"{m['cmasd_exploring_catch_up_tokens']:.0f} | {m['cmasd_drafter_seconds']:.1f} | "
            f"{_percent(m.get('prefix_cache_hit_rate'))} |"
        )
    speedups = record.get("speedup_vs_ar") or []
    if speedups:
        lines += ["", "Output tok/s over plain decoding's in the same round: median over rounds (range; "
                  "95% confidence interval of the rounds' geometric mean, Student's t over their log ratios; each round's).", "",
                  "| method | concurrency | vs plain, median | range | 95% CI | per round |", "|---|---:|---:|---:|---:|---|"]
        for row in speedups:
            interval = row.get("interval")
            shown = "-" if interval is None else f"{interval[0]:.3f}-{interval[1]:.3f}"
            lines.append(f"| {row['label']} | {row['concurrency']} | {row['median']:.3f}x | "
                         f"{row['min']:.3f}-{row['max']:.3f} | {shown} | {', '.join(f'{x:.3f}' for x in row['ratios'])} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# CLI


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vllm_cmasd.engines import DEFAULT_DRAFT, DEFAULT_EAGLE3, DEFAULT_TARGET

    p.add_argument("--out", required=True, help="output directory (serve.json, serve.md, logs/)")
    p.add_argument("--target", default=str(DEFAULT_TARGET))
    p.add_argument("--draft", default=str(DEFAULT_DRAFT))
    p.add_argument("--eagle3", default=str(DEFAULT_EAGLE3), help="EAGLE-3 head for eagle3 and cmasd_eagle3")
    p.add_argument("--concurrency", type=_int_list, default=[1, 8, 32], help="levels, e.g. 1,8,32")
    p.add_argument("--requests-per-concurrency", type=int, default=2, help="requests per level = this x concurrency")
    p.add_argument("--min-requests", type=int, default=8, help="... and at least this many per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=24, help="the benchmark's first N prompts, cycled")
    p.add_argument("--k", type=int, default=4, help="the fixed k of vLLM's draft-model and EAGLE-3 speculation")
    p.add_argument("--k-max", type=int, default=8, help="CM-ASD's k_max (num_speculative_tokens)")
    p.add_argument("--methods", default="ar,draft_model,cmasd_exact,cmasd",
                   help="comma list of ar, draft_model, cmasd, cmasd_exact, cmasd_budget, rstitch, eagle3, cmasd_eagle3")
    p.add_argument("--rstitch-entropy", type=float, default=1.0, help="rstitch: entropy (nats) below which drafts stand")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="CPU only: KV-cache pool per server")
    p.add_argument("--block-size", type=int, default=None,
                   help="KV-cache block size of every server (default: vLLM's, 128 tokens on CPU)")
    p.add_argument("--rounds", type=int, default=1,
                   help="each method's server once a round, in turn (order reversed every other round)")


def main_from_args(args: argparse.Namespace) -> int:
    offered = serve_methods(args.k, args.k_max, args.rstitch_entropy)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(offered))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; allowed: {list(offered)}")
    cfg = ServeBenchConfig(
        target=args.target, draft=args.draft, eagle3=args.eagle3, methods=[offered[n] for n in names],
        concurrencies=args.concurrency, requests_per_concurrency=args.requests_per_concurrency,
        min_requests=args.min_requests,
        max_tokens=args.max_tokens, num_prompts=args.num_prompts, max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib, block_size=args.block_size, rounds=args.rounds,
    )
    record = run_serve_bench(cfg, args.out)
    print(markdown_table(record))
    errors = sum(r["summary"]["errors"] for r in record["results"])
    return 1 if errors else 0
