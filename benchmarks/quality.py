#!/usr/bin/env python
"""Quality benchmark: perplexity, time and memory of UniPruning vs Wanda, SparseGPT, magnitude.

    python benchmarks/quality.py MODEL --methods unipruning wanda sparsegpt magnitude \\
        --configs 0.5 0.6 0.7 2:4 4:8

For every (method, config) the model is loaded fresh from disk, pruned with llm-compressor's
``oneshot`` (sequential pipeline, the same calibration windows for every run) or, for
``magnitude``, by keeping the largest |W| of each target layer; then its perplexity on the
evaluation text and the achieved sparsity of the target layers (every Linear except lm_head)
are measured. One JSON object per run goes to stdout (and is appended to ``--output``);
progress and library logs go to stderr. See benchmarks/README.md.

Configs: a float ``p`` is unstructured sparsity p (a fraction pruned per layer); ``N:M`` keeps
N weights in every group of M consecutive inputs (UniPruning's convention). Wanda and
SparseGPT count the other way ("N:M" = prune N of M), so they are given ``(M-N):M`` and
``sparsity = 1 - N/M``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

# JSON lines go to the real stdout; everything else that prints (llm-compressor's loguru sink
# is sys.stdout, and it warns at import time on a CPU-only machine) is sent to stderr.
RESULTS = sys.stdout

with contextlib.redirect_stdout(sys.stderr):
    import torch
    import yaml
    from loguru import logger

    import llmcompressor  # noqa: F401  (configures loguru)
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session
    from llmcompressor.logger import support_log_once
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import unipruning_modifier  # noqa: F401  (registers UniPruningModifier)
    from unipruning_modifier import UniPruningModifier
    from unipruning_modifier import data as updata
    from unipruning_modifier import evaluation
    from unipruning_modifier.device import PeakMemory, empty_cache, select_device, timed


def _log_to_stderr() -> None:
    """Re-point llm-compressor's loguru console sink at stderr (it is sys.stdout upstream)."""
    level = os.environ.get("LLM_COMPRESSOR_LOG_LEVEL", "INFO").upper()
    logger.remove()
    logger.add(
        sys.stderr,
        level=level,
        format="{time:HH:mm:ss} | {function} | {level} - {message}",
        filter=support_log_once,
    )


def log(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


METHODS = ("unipruning", "wanda", "sparsegpt", "magnitude")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPARSITY_TOLERANCE = 0.005  # achieved vs requested, over all target layers


# --------------------------------------------------------------------------- configs


class Config:
    """One sparsity config: unstructured ``p`` or N:M (N kept of every M)."""

    def __init__(self, text: str):
        self.text = text.strip()
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", self.text)
        if match:
            self.n, self.m = int(match.group(1)), int(match.group(2))
            if not 0 < self.n < self.m:
                raise ValueError(f"config {text!r}: N:M needs 0 < N < M (N = weights kept)")
            self.sparsity = 1.0 - self.n / self.m
        else:
            try:
                self.sparsity = float(self.text)
            except ValueError:
                raise ValueError(f"config {text!r} is neither a sparsity in [0, 1) nor N:M") from None
            if not 0.0 <= self.sparsity < 1.0:
                raise ValueError(f"config {text!r}: sparsity must be in [0, 1)")
            self.n = self.m = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return self.text


# --------------------------------------------------------------------------- helpers


def target_names(model: torch.nn.Module) -> list[str]:
    """Names of the layers every method prunes and sparsity is measured on: Linear, not lm_head."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and module is not output
        and not re.fullmatch(r".*lm_head", name)
    ]


def nm_pattern_ok(model: torch.nn.Module, names: list[str], n: int, m: int) -> bool:
    """True when every group of M consecutive inputs of every target layer has <= N nonzeros."""
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight.detach()
        if weight.shape[-1] % m:
            return False
        nonzero = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
        if int(nonzero.max()) > n:
            return False
    return True


@torch.no_grad()
def magnitude_prune(model: torch.nn.Module, names: list[str], config: Config) -> None:
    """Keep the largest |W| per layer (unstructured) or per group of M inputs (N:M).

    Ties (common: bf16 checkpoints have few distinct magnitudes) go to the lower index, via a
    stable sort, so CPU and GPU runs pick the same weights.
    """
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        score = weight.detach().abs().float()
        if config.structured:
            if weight.shape[-1] % config.m:
                raise ValueError(f"{name} has {weight.shape[-1]} inputs, not a multiple of {config.m}")
            groups = score.reshape(weight.shape[0], -1, config.m)
            order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(-1, order[..., : config.n], True)
            keep = keep.reshape(weight.shape)
        else:
            total = score.numel()
            kept = total - int(round(config.sparsity * total))
            order = torch.sort(score.reshape(-1), descending=True, stable=True).indices
            keep = torch.zeros(total, dtype=torch.bool, device=score.device)
            keep[order[:kept]] = True
            keep = keep.reshape(weight.shape)
        weight.masked_fill_(~keep, 0)


def build_modifier(method: str, config: Config, extra: dict, seed: int):
    ignore = ["re:.*lm_head"]
    if method == "unipruning":
        kwargs = {"ignore": ignore, "seed": seed}
        if config.structured:
            kwargs["mask_structure"] = f"{config.n}:{config.m}"
        else:
            kwargs["sparsity"] = config.sparsity
        kwargs.update(extra)
        return UniPruningModifier(**kwargs)
    if config.structured:
        # llm-compressor's SparsityModifierBase: "N:M" prunes N of every M, sparsity also required
        mask_structure = f"{config.m - config.n}:{config.m}"
    else:
        mask_structure = "0:0"
    kwargs = dict(sparsity=config.sparsity, mask_structure=mask_structure, targets=["Linear"], ignore=ignore)
    if method == "wanda":
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        return WandaPruningModifier(**kwargs)
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return SparseGPTModifier(**kwargs)
    raise ValueError(f"unknown method {method!r}")


def parse_extra(items: list[str]) -> dict:
    extra = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"--unipruning-args expects KEY=VALUE, got {item!r}")
        extra[key.strip()] = yaml.safe_load(value)
    for key in ("sparsity", "mask_structure"):
        if key in extra:
            raise argparse.ArgumentTypeError(f"--unipruning-args {key}=...: set it with --configs instead")
    return extra


SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the repository


def default_text(shared: str, demo) -> str:
    return shared if Path(shared).is_file() else demo()


def drop_fx_autowrap_namespaces() -> int:
    """Forget the namespaces llm-compressor's sequential tracing left in torch.fx; return how many.

    torch.fx.wrap(name) records the calling frame's globals in the module-level registry
    ``torch.fx._symbolic_trace._wrapped_fns_to_patch`` and never lets go. llm-compressor 0.14's
    sequential pipeline calls it from code it ``exec``s in throw-away namespaces: the autowrapped
    forward (pipelines/sequential/ast_helpers.py, a namespace holding ``self`` = the model) and
    each traced subgraph's generated code (pipelines/sequential/helpers.py). So every ``oneshot``
    keeps its model (weights on the device too) alive for the life of the process: in a sweep,
    one leaked model per run, inflating the memory figures of every later run. Entries whose
    globals are a real module's ``__dict__`` (ordinary top-level ``torch.fx.wrap`` users) stay.
    """
    try:
        from torch.fx import _symbolic_trace
    except ImportError:
        return 0
    registry = getattr(_symbolic_trace, "_wrapped_fns_to_patch", None)
    if not isinstance(registry, dict):
        return 0
    module_globals = {id(vars(m)) for m in list(sys.modules.values()) if hasattr(m, "__dict__")}
    stale = [key for key, namespace in registry.items() if id(namespace) not in module_globals]
    for key in stale:
        del registry[key]
    return len(stale)


def release(device: torch.device) -> None:
    drop_fx_autowrap_namespaces()
    gc.collect()
    empty_cache(device)


# --------------------------------------------------------------------------- runs


def _cost(memory: PeakMemory, timing: dict) -> dict:
    """The seconds and peak-memory fields of a JSON line."""
    return {
        "seconds": timing["seconds"],
        "peak_memory_mb": memory.peak_mb,
        "rss_peak_mb": memory.rss_peak_mb,
        "device_peak_mb": memory.device_peak_mb,
    }


class Benchmark:
    def __init__(self, args):
        self.args = args
        self.device = select_device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.extra = parse_extra(args.unipruning_args)
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.calib_ds = updata.calibration_dataset(
            self.tokenizer, updata.read_text(args.calib), args.num_samples, args.seq_len, args.seed
        )
        self.eval_tokens = updata.token_stream(self.tokenizer, updata.read_text(args.eval))
        self.heldout_tokens = (
            updata.token_stream(self.tokenizer, updata.read_text(args.heldout)) if args.heldout else None
        )
        used = min(self.eval_tokens.numel(), args.eval_tokens) // args.eval_window * args.eval_window
        self.eval_tokens_used = used
        if len(self.calib_ds) < args.num_samples:
            log(f"WARNING: calibration text gives only {len(self.calib_ds)} windows of {args.seq_len} "
                f"tokens (asked {args.num_samples})")
        if used < args.eval_tokens:
            log(f"WARNING: evaluating on {used} tokens (asked {args.eval_tokens}; text has "
                f"{self.eval_tokens.numel()})")
        self.output = open(args.output, "a", encoding="utf-8") if args.output else None
        self.results: list[dict] = []

    def load(self) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(self.args.model, dtype=self.dtype)
        return model.to(self.device).eval()

    def record(self, method: str, config: str, **fields) -> dict:
        args = self.args
        row = {
            "method": method,
            "config": config,
            "sparsity": None,
            "ppl": None,
            "seconds": None,
            "peak_memory_mb": None,
            "rss_peak_mb": None,
            "device_peak_mb": None,
        }
        row.update(fields)
        row.update(
            device=str(self.device),
            model=args.model,
            dtype=args.dtype,
            num_samples=args.num_samples,
            calib_samples=len(self.calib_ds),
            seq_len=args.seq_len,
            eval_window=args.eval_window,
            eval_tokens=self.eval_tokens_used,
            seed=args.seed,
            extra=self.extra if method == "unipruning" else {},
            sequential_targets=args.sequential_targets,
            label=args.label,
        )
        line = json.dumps(row)
        print(line, file=RESULTS, flush=True)
        if self.output:
            self.output.write(line + "\n")
            self.output.flush()
        self.results.append(row)
        return row

    def evaluate(self, model) -> tuple[float, dict, list[str]]:
        """Achieved sparsity, {"ppl": on --eval, "ppl_heldout": on --heldout if given}, target names."""
        names = target_names(model)
        sparsity = evaluation.total_sparsity(model, names)
        window, limit = self.args.eval_window, self.args.eval_tokens
        ppl = {"ppl": evaluation.perplexity(model, self.eval_tokens, window, limit)}
        if self.heldout_tokens is not None:
            ppl["ppl_heldout"] = evaluation.perplexity(model, self.heldout_tokens, window, limit)
        return sparsity, ppl, names

    def dense(self) -> None:
        log("dense baseline")
        model = None
        try:
            model = self.load()
            sparsity, ppl, _ = self.evaluate(model)
            self.record("dense", "-", sparsity=sparsity, **ppl, target_sparsity=0.0)
            log(f"dense: {ppl}")
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the sweep
            self.failed("dense", "-", error)
        finally:
            del model
            release(self.device)

    def timed_oneshot(self, model, recipe, calibrate: bool = True) -> dict:
        """``oneshot(model, recipe)`` on the shared calibration windows (or data-free with
        ``calibrate=False``), timed alone; its seconds and peak memory fields."""
        data = dict(
            dataset=self.calib_ds,
            num_calibration_samples=self.args.num_samples,
            max_seq_length=self.args.seq_len,
            processor=self.tokenizer,
            pipeline="sequential",
        )
        if self.args.sequential_targets:
            data["sequential_targets"] = self.args.sequential_targets
        torch.manual_seed(self.args.seed)  # oneshot's RandomSampler: same batch order every run
        with PeakMemory(self.device) as memory, timed(self.device) as timing:
            oneshot(model=model, recipe=recipe, **(data if calibrate else {}))
        return _cost(memory, timing)

    def run(self, method: str, config: Config) -> None:
        args = self.args
        log(f"{method} {config}: loading {args.model}")
        model = None
        try:
            modifier = None if method == "magnitude" else build_modifier(method, config, self.extra, args.seed)
            model = self.load()
            if method == "magnitude":
                names = target_names(model)
                with PeakMemory(self.device) as memory, timed(self.device) as timing:
                    magnitude_prune(model, names, config)
                cost = _cost(memory, timing)
            else:
                cost = self.timed_oneshot(model, [modifier])
            model.eval()
            sparsity, ppl, names = self.evaluate(model)
            checks = {"target_sparsity": config.sparsity}
            if abs(sparsity - config.sparsity) > SPARSITY_TOLERANCE:
                message = (f"achieved sparsity {sparsity:.4f} differs from the requested "
                           f"{config.sparsity:.4f} by more than {SPARSITY_TOLERANCE}")
                checks["sparsity_warning"] = message
                log(f"WARNING {method} {config}: {message}")
            if config.structured:
                ok = nm_pattern_ok(model, names, config.n, config.m)
                checks["nm_pattern_ok"] = ok
                if not ok:
                    log(f"WARNING {method} {config}: some group of {config.m} keeps more than {config.n} weights")
            self.record(
                method,
                str(config),
                sparsity=sparsity,
                **ppl,
                **cost,
                **checks,
            )
            log(f"{method} {config}: sparsity {sparsity:.4f} {ppl} in {cost['seconds']:.1f}s")
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the sweep
            self.failed(method, str(config), error)
        finally:
            del model
            with contextlib.suppress(Exception):
                reset_session()
            release(self.device)

    def failed(self, method: str, config: str, error: Exception) -> None:
        traceback.print_exc(file=sys.stderr)
        log(f"{method} {config} FAILED: {type(error).__name__}: {error}")
        self.record(method, config, error=f"{type(error).__name__}: {error}")


# --------------------------------------------------------------------------- plot


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed; skipping --plot {path} (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = [r for r in results if r["method"] == "dense" and r.get("ppl") is not None]
    for method in dict.fromkeys(r["method"] for r in results):
        if method == "dense":
            continue
        points = sorted(
            (r["sparsity"], r["ppl"])
            for r in results
            if r["method"] == method and ":" not in r["config"] and r.get("ppl") is not None
        )
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    if dense:
        ax.axhline(dense[0]["ppl"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("achieved sparsity (target layers)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    if results:
        model = Path(results[0]["model"])
        label = results[0].get("label")
        ax.set_title(f"{model.parent.name}/{model.name}" + (f" ({label})" if label else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot written to {path}")


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Perplexity / time / memory of UniPruning vs Wanda, SparseGPT and magnitude pruning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", help="local Hugging Face causal LM folder ('demo' = the vendored demo model)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--configs", nargs="+", default=["0.5", "0.6", "0.7", "2:4", "4:8"],
                        help="unstructured sparsity p, or N:M (N weights kept in every M)")
    parser.add_argument("--calib", default=default_text(str(SHARED / "data" / "calib.txt"), updata.demo_calibration_text),
                        metavar="TEXT_FILE", help="calibration text")
    parser.add_argument("--eval", default=default_text(str(SHARED / "data" / "dev_eval.txt"), updata.demo_eval_text),
                        metavar="TEXT_FILE", help="evaluation text")
    parser.add_argument("--heldout", default=None, metavar="TEXT_FILE",
                        help="a second held-out text, never used to choose settings (adds ppl_heldout)")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration window length (tokens)")
    parser.add_argument("--eval-window", type=int, default=1024, help="perplexity window (tokens)")
    parser.add_argument("--eval-tokens", type=int, default=131072, help="evaluation tokens used at most")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, npu or cpu (None: select_device(), i.e. CUDA, then NPU, then CPU)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype the model is loaded in")
    parser.add_argument("--seed", type=int, default=0,
                        help="calibration windows, batch order and UniPruningModifier.seed")
    parser.add_argument("--output", default=None, help="JSONL file the lines are appended to")
    parser.add_argument("--unipruning-args", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra UniPruningModifier fields, values parsed as YAML (kappa=0.02 metric=wanda)")
    parser.add_argument("--sequential-targets", nargs="+", default=None, metavar="CLASS",
                        help="oneshot's sequential_targets (default: the decoder layer class), e.g. "
                             "LlamaAttention LlamaMLP to calibrate each MLP on the pruned attention's outputs")
    parser.add_argument("--label", default=None, help="free text added to every line")
    parser.add_argument("--plot", default=None, metavar="PNG", help="perplexity vs sparsity (unstructured configs)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline line")
    args = parser.parse_args(argv)
    if args.model == "demo":
        args.model = updata.demo_model_path()
    try:
        args.configs = [Config(c) for c in args.configs]
        parse_extra(args.unipruning_args)
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(str(error))
    if not Path(args.model).is_dir():
        parser.error(f"model {args.model!r} is not a local folder")
    return args


def script_main(parse, run, argv=None) -> int:
    """Entry point shared by the benchmark scripts: library logs to stderr, JSON lines alone on stdout."""
    _log_to_stderr()
    args = parse(argv)
    sys.stdout = sys.stderr  # stray prints (libraries, tqdm.write) must not mix with the JSON lines
    start = time.perf_counter()
    try:
        return run(args)
    finally:
        log(f"done in {time.perf_counter() - start:.1f}s")
        sys.stdout = RESULTS


def main(argv=None) -> int:
    return script_main(parse_args, sweep, argv)


def sweep(args) -> int:
    bench = Benchmark(args)
    log(f"model {args.model} on {bench.device} ({args.dtype}); {len(bench.calib_ds)} calibration windows "
        f"of {args.seq_len}; eval {bench.eval_tokens_used} tokens in windows of {args.eval_window}")
    if not args.no_dense:
        bench.dense()
    for method in args.methods:
        for config in args.configs:
            bench.run(method, config)
    if args.plot:
        plot(bench.results, args.plot)
    if bench.output:
        bench.output.close()
    return 1 if any("error" in r for r in bench.results) else 0


if __name__ == "__main__":
    sys.exit(main())
