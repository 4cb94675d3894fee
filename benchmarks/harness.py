"""The benchmark harness the scripts share: data, runs, JSON lines, costs.

``Benchmark`` loads the calibration windows and evaluation tokens once, loads the model fresh
for every run, times ``oneshot`` (wall and process CPU seconds, peak memory), measures
perplexity and sparsity, and prints one JSON object per run to stdout (appended to
``--output`` too); progress and library logs go to stderr. ``add_common_arguments`` gives every
script the same data and model options; ``script_main`` runs a script with that stdout/stderr
split. Scripts: quality.py, extract.py, quantize.py, reconstruction_solvers.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

# JSON lines go to the real stdout; everything else that prints (llm-compressor's loguru sink
# is sys.stdout, and it warns at import time on a CPU-only machine) is sent to stderr.
RESULTS = sys.stdout

with contextlib.redirect_stdout(sys.stderr):
    import torch
    from loguru import logger

    import llmcompressor  # noqa: F401  (configures loguru)
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session
    from llmcompressor.logger import support_log_once
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import unipruning_modifier  # noqa: F401  (registers the modifiers)
    from unipruning_modifier import data as updata
    from unipruning_modifier import evaluation
    from unipruning_modifier.device import PeakMemory, empty_cache, select_device, timed
    from unipruning_modifier.structure import parse_mask_structure

LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPARSITY_TOLERANCE = 0.005  # achieved vs requested, over all target layers
SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the repository


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _log_to_stderr() -> None:
    """Re-point llm-compressor's loguru console sink at stderr (it is sys.stdout upstream)."""
    level = os.environ.get("LLM_COMPRESSOR_LOG_LEVEL", "INFO").upper()
    logger.remove()
    logger.add(sys.stderr, level=level, format="{time:HH:mm:ss} | {function} | {level} - {message}", filter=support_log_once)


class Config:
    """One sparsity config: unstructured ``p``, or N:M as the recipes' mask_structure reads it."""

    def __init__(self, text: str):
        self.text = text.strip()
        if ":" in self.text:
            self.n, self.m = parse_mask_structure(self.text)  # N pruned of every M
            self.sparsity = self.n / self.m
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


def target_names(model: torch.nn.Module) -> list[str]:
    """Names of the layers every method prunes and sparsity is measured on: Linear, not lm_head."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output and not name.endswith("lm_head")
    ]


def nm_pattern_ok(model: torch.nn.Module, names: list[str], n: int, m: int) -> bool:
    """True when every group of M consecutive inputs of every target layer has <= N nonzeros."""
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight.detach()
        if weight.shape[-1] % m:
            return False
        if int((weight != 0).reshape(weight.shape[0], -1, m).sum(-1).max()) > n:
            return False
    return True


def default_text(shared: str, demo) -> str:
    return shared if Path(shared).is_file() else demo()


def drop_fx_autowrap_namespaces() -> int:
    """Forget the namespaces llm-compressor's sequential tracing left in torch.fx; return how many.

    torch.fx.wrap(name) records the calling frame's globals in the module-level registry
    ``torch.fx._symbolic_trace._wrapped_fns_to_patch`` and never lets go. llm-compressor 0.14's
    sequential pipeline calls it from code it ``exec``s in throw-away namespaces (a namespace
    holding ``self`` = the model), so every ``oneshot`` keeps its model alive for the life of the
    process: in a sweep, one leaked model per run, inflating the memory figures of every later
    run. Entries whose globals are a real module's ``__dict__`` stay.
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
    """After a run: end llm-compressor's session, free the model and the device's cache."""
    with contextlib.suppress(Exception):
        reset_session()
    drop_fx_autowrap_namespaces()
    gc.collect()
    empty_cache(device)


def add_common_arguments(parser: argparse.ArgumentParser, num_samples: int = 128, seq_len: int = 512) -> None:
    """The model, data and cost options every script takes."""
    parser.add_argument("model", help="local Hugging Face causal LM folder ('demo' = the vendored demo model)")
    parser.add_argument("--calib", default=default_text(str(SHARED / "data" / "calib.txt"), updata.demo_calibration_text),
                        metavar="TEXT_FILE", help="calibration text")
    parser.add_argument("--eval", default=default_text(str(SHARED / "data" / "dev_eval.txt"), updata.demo_eval_text),
                        metavar="TEXT_FILE", help="evaluation text")
    parser.add_argument("--heldout", default=None, metavar="TEXT_FILE",
                        help="a second held-out text, never used to choose settings (adds ppl_heldout)")
    parser.add_argument("--num-samples", type=int, default=num_samples, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="calibration window length (tokens)")
    parser.add_argument("--calib-windows", choices=("random", "first"), default="random",
                        help="random: windows drawn with --seed from the whole text; first: the text's first windows, in order")
    parser.add_argument("--eval-window", type=int, default=1024, help="perplexity window (tokens)")
    parser.add_argument("--eval-tokens", type=int, default=131072, help="evaluation tokens used at most")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, npu or cpu (None: CUDA, then NPU, then CPU)")
    parser.add_argument("--dtype", default="float32", choices=sorted(LOAD_DTYPES), help="dtype the model is loaded in")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: CPU seconds compare across runs)")
    parser.add_argument("--seed", type=int, default=0, help="calibration windows, batch order and the pruners' seeds")
    parser.add_argument("--output", default=None, help="JSONL file the lines are appended to")
    parser.add_argument("--label", default=None, help="free text added to every line")


def finish_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Resolve 'demo' and refuse a model that is not a local folder."""
    if args.model == "demo":
        args.model = updata.demo_model_path()
    if not Path(args.model).is_dir():
        parser.error(f"model {args.model!r} is not a local folder")
    return args


def _cost(memory: PeakMemory, timing: dict) -> dict:
    """The seconds and peak-memory fields of a JSON line."""
    return {
        "seconds": timing["seconds"],
        "cpu_seconds": timing["cpu_seconds"],
        "peak_memory_mb": memory.peak_mb,
        "rss_peak_mb": memory.rss_peak_mb,
        "device_peak_mb": memory.device_peak_mb,
    }


class Benchmark:
    """Data loaded once; a fresh model, a timed ``oneshot`` and one JSON line per run."""

    def __init__(self, args):
        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = select_device(args.device)
        self.dtype = LOAD_DTYPES[args.dtype]
        self.extra: dict = {}  # recipe fields a script adds to its own method's lines
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokens = updata.token_stream(self.tokenizer, updata.read_text(args.calib))
        if args.calib_windows == "first":
            windows = tokens[: args.num_samples * args.seq_len].reshape(-1, args.seq_len)
            self.calib_ds = updata.windows_dataset(windows)
        else:
            self.calib_ds = updata.windows_dataset(updata.calibration_windows(tokens, args.num_samples, args.seq_len, args.seed))
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
        row = {"method": method, "config": config, "sparsity": None, "ppl": None, "seconds": None,
               "cpu_seconds": None, "peak_memory_mb": None, "rss_peak_mb": None, "device_peak_mb": None}
        row.update(fields)
        row.update(
            device=str(self.device),
            model=args.model,
            dtype=args.dtype,
            num_samples=args.num_samples,
            calib_samples=len(self.calib_ds),
            seq_len=args.seq_len,
            calib_windows=args.calib_windows,
            eval_window=args.eval_window,
            eval_tokens=self.eval_tokens_used,
            threads=torch.get_num_threads(),
            seed=args.seed,
            extra=self.extra.get(method, {}),
            sequential_targets=getattr(args, "sequential_targets", None),
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
            num_calibration_samples=len(self.calib_ds),
            max_seq_length=self.args.seq_len,
            processor=self.tokenizer,
            pipeline="sequential",
            # "first" windows stay in text order; "random" ones are shuffled by oneshot, seeded
            shuffle_calibration_samples=self.args.calib_windows == "random",
        )
        if getattr(self.args, "sequential_targets", None):
            data["sequential_targets"] = self.args.sequential_targets
        torch.manual_seed(self.args.seed)  # oneshot's RandomSampler: same batch order every run
        with PeakMemory(self.device) as memory, timed(self.device) as timing:
            oneshot(model=model, recipe=recipe, **(data if calibrate else {}))
        return _cost(memory, timing)

    def failed(self, method: str, config: str, error: Exception) -> None:
        traceback.print_exc(file=sys.stderr)
        log(f"{method} {config} FAILED: {type(error).__name__}: {error}")
        self.record(method, config, error=f"{type(error).__name__}: {error}")


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
