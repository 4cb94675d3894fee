"""vLLM engine cost of serving a checkpoint: dense original vs pruned (dense save) vs sparse (plugin).

Run in a vLLM environment with this package installed (README "Serve with vLLM"); the
checkpoints come from the compress environment, e.g. for the 2:4 rows of docs/serving.md:

    unipruning prune --model ../shared/models/uni-tiny-28m --output out/28m-24
    unipruning prune --model ../shared/models/uni-tiny-28m --output out/28m-24-dense --save-format dense
    python benchmarks/serve.py --model dense=../shared/models/uni-tiny-28m \\
        --model pruned-dense=out/28m-24-dense --model sparse=out/28m-24 --out serve.jsonl

Each model is measured in a fresh process, with vLLM's engine in its own child process as
users run it; ``--rounds`` repeats the sequence of models and the best value of each metric is
kept, against the noise of a shared machine. One JSON line per model and round:
``engine_start_s`` (``vllm.LLM(...)``, after import), ``ttft_s`` (median latency of one
``--prompt-len``-token prompt to its first token), ``tok_s_b{B}`` (generated tokens per second
for a batch of B distinct prompts, ``--new-tokens`` each, EOS ignored, best of ``--repeats``),
``peak_rss_mb`` (peak RSS of this process plus the engine's, each process's ``VmHWM``, read
before the engine stops), ``model_load_gib`` (vLLM's
own "Model loading took" figure, GPU only), and the plugin's per-layer paths. A table of the
best values goes to stderr. On a GPU the plugin picks cuSPARSELt per layer where it measured faster
(``UNIPRUNING_SPARSE_KERNEL=auto|off|always`` is passed through); on a CPU it serves dense.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse_model(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=PATH")
    if not (Path(path) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: no config.json in {path}")
    return label, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=parse_model, action="append", required=True, metavar="LABEL=PATH")
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (auto: the checkpoint's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (best kept)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over all models (best kept)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--worker", nargs=2, metavar=("LABEL", "PATH"), help=argparse.SUPPRESS)
    return parser


def prompts(tokenizer, count: int, length: int) -> list[dict]:
    """``count`` distinct token windows of the package's evaluation text (no shared prefixes)."""
    from unipruning_modifier import data

    ids = tokenizer(data.read_text(data.demo_eval_text()), add_special_tokens=False)["input_ids"]
    if len(ids) < count * length:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, {count} x {length} needed")
    return [{"prompt_token_ids": ids[i * length : (i + 1) * length]} for i in range(count)]


def measure(label: str, path: str, args: argparse.Namespace) -> dict:
    """One model: engine start, TTFT, throughput per batch size, the engine's peak RSS."""
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(
        model=path,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        enable_prefix_caching=False,  # repeated prompts must be prefilled again, every time
        seed=0,
    )
    result = {"label": label, "model": path, "engine_start_s": time.perf_counter() - start}
    try:
        run_requests(llm, args, result)
        result["peak_rss_mb"] = peak_rss_mb()
    finally:
        llm.llm_engine.engine_core.shutdown()
    return result


def peak_rss_mb() -> float:
    """Sum of the peak RSS (``VmHWM``) of this process and its descendants (the engine, workers)."""
    import psutil  # a vLLM requirement

    total = 0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        total += int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1))
    return total / 1024


def run_requests(llm, args: argparse.Namespace, result: dict) -> None:
    from vllm import SamplingParams

    windows = prompts(llm.get_tokenizer(), max(args.batch) + 1, args.prompt_len)
    first = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate(windows[-1:], first, use_tqdm=False)  # warm-up
    ttft = []
    for _ in range(5):
        begin = time.perf_counter()
        llm.generate(windows[-1:], first, use_tqdm=False)
        ttft.append(time.perf_counter() - begin)
    result["ttft_s"] = statistics.median(ttft)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    for batch in args.batch:
        llm.generate(windows[:batch], params, use_tqdm=False)  # warm-up
        best = 0.0
        for _ in range(args.repeats):
            begin = time.perf_counter()
            outs = llm.generate(windows[:batch], params, use_tqdm=False)
            seconds = time.perf_counter() - begin
            best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / seconds)
        result[f"tok_s_b{batch}"] = best


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def environment(args: argparse.Namespace) -> dict:
    import torch
    import vllm

    gpu = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if gpu else cpu_name(),
        "cpus": len(os.sched_getaffinity(0)),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "sparse_kernel": os.environ.get("UNIPRUNING_SPARSE_KERNEL", "auto"),
    }


def worker(args: argparse.Namespace) -> None:
    label, path = args.worker
    result = {**measure(label, path, args), **environment(args)}
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(label: str, path: str, argv: list[str]) -> dict:
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}  # GiB of KV cache on a CPU, the same for every model
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--worker", label, path], capture_output=True, text=True, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{label} ({path}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    loaded = re.findall(r"Model loading took ([0-9.]+) GiB", proc.stdout + proc.stderr)
    result["model_load_gib"] = float(loaded[-1]) if loaded else None
    result["plugin_paths"] = sorted({line.split("]: ", 1)[1] for line in proc.stdout.splitlines() if "unipruning-sparse " in line and "]: " in line})
    return result


def table(results: list[dict], batches: list[int]) -> str:
    """Best value per model and metric, and each model's ratio to the first model."""
    metrics = ["engine_start_s", "ttft_s", *[f"tok_s_b{b}" for b in batches], "peak_rss_mb"]
    higher_is_better = {m for m in metrics if m.startswith("tok_s")}
    best: dict[str, dict] = {}
    for r in results:
        row = best.setdefault(r["label"], {})
        for m in metrics:
            pick = max if m in higher_is_better else min
            row[m] = r[m] if m not in row else pick(row[m], r[m])
    reference = next(iter(best.values()))
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for label, row in best.items():
        cells = [f"{row[m]:.0f}" if row[m] >= 100 else f"{row[m]:.3g}" for m in metrics]
        cells = [f"{cell} ({row[m] / reference[m]:.2f}x)" for cell, m in zip(cells, metrics)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        print(f"error: benchmarks/serve.py runs in a vLLM environment ({error}); see README 'Serve with vLLM'", file=sys.stderr)
        return 2
    sink = open(args.out, "a") if args.out else None
    results = []
    for round_index in range(args.rounds):
        for label, path in args.model:
            result = {**run_worker(label, path, argv), "round": round_index}
            results.append(result)
            line = json.dumps(result)
            print(line, flush=True)
            if sink:
                sink.write(line + "\n")
                sink.flush()
    print(table(results, args.batch), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
