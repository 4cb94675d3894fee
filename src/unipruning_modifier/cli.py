"""The ``unipruning`` command: prune a causal LM with a recipe and report what it cost.

``unipruning prune`` with no arguments prunes the built-in demo model on the built-in text, so
it runs offline. Every input is checked before the model is loaded; the checkpoint is written
to a temporary folder beside ``--output`` and renamed only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from . import data

BUILTIN_RECIPES = resources.files("unipruning_modifier") / "recipes"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(ValueError):
    """A bad argument, found before any work starts."""


def resolve_recipe(value: str) -> str:
    """A recipe file path, or the name of a built-in recipe (``uni_24``, ``uni_unstructured_50``...)."""
    path = Path(value)
    if path.is_file():
        return str(path)
    builtin = BUILTIN_RECIPES / f"{value.removesuffix('.yaml')}.yaml"
    if builtin.is_file():
        return str(builtin)
    names = sorted(p.name.removesuffix(".yaml") for p in BUILTIN_RECIPES.iterdir() if p.name.endswith(".yaml"))
    raise UsageError(f"--recipe {value!r}: no such file, and not a built-in recipe ({', '.join(names)})")


def load_recipe(path: str):
    """Parse a recipe and instantiate its modifiers, so bad fields fail before the model loads."""
    from llmcompressor.recipe import Recipe

    try:
        recipe = Recipe.create_instance(path)
    except Exception as error:
        raise UsageError(f"--recipe {path}: {error}") from error
    if not recipe.modifiers:
        raise UsageError(
            f"--recipe {path} defines no modifiers: top-level keys must end in '_stage' and the next "
            "level in '_modifiers' (see recipes/uni_24.yaml)"
        )
    return recipe


def check_model(value: str) -> str:
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {value}: folder has no config.json")
        return str(path)
    if value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value:
        raise UsageError(f"--model {value}: no such folder")
    return value  # a hub id such as org/name


def check_output(value: str, overwrite: bool) -> Path:
    path = Path(value).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UsageError(f"--output {value} exists and is not empty (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise UsageError(f"--output {value}: parent folder {path.parent} does not exist")
    return path


def publish(staging: Path, output: Path) -> None:
    """Move a complete checkpoint into place (replacing an old one only now).

    The staging folder is private while it is written (mkdtemp); the result gets the usual
    permissions of a new folder under the user's umask.
    """
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    staging.rename(output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unipruning", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune", help="prune a model with a recipe and save it")
    prune.add_argument("--model", help="local folder or hub id (default: the built-in demo model)")
    prune.add_argument("--recipe", default="uni_24", help="YAML file or built-in name (default: uni_24)")
    prune.add_argument("--dataset", help="calibration text file or HF dataset name[:config] (default: built-in text)")
    prune.add_argument("--eval-text", help="held-out text file for perplexity (default: built-in text)")
    prune.add_argument("--output", default="pruned-model", help="folder for the pruned checkpoint")
    prune.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    prune.add_argument(
        "--save-format", choices=("sparse", "dense"), default="sparse",
        help="sparse: pruned layers as sparse-24-bitmask / sparse-bitmask (unquantized models); dense: zeros",
    )
    prune.add_argument("--num-samples", type=int, default=None, help="calibration windows (default 128; demo 64)")
    prune.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 512; demo 256)")
    prune.add_argument("--eval-window", type=int, default=512, help="tokens per perplexity window")
    prune.add_argument("--eval-tokens", type=int, default=65536, help="at most this many eval tokens")
    prune.add_argument("--device", help="cuda, cuda:N, npu, cpu (default: best available)")
    prune.add_argument("--dtype", choices=DTYPES, default="auto", help="load dtype (auto: fp32 on CPU)")
    prune.add_argument("--seed", type=int, default=0, help="seed of the calibration window choice")
    prune.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
    return parser


def checkpoint_dtype(config):
    """The dtype a checkpoint was saved in (fp32 when its config does not say)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _default(value, fallback):
    return fallback if value is None else value


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")
    return value


def prune(args: argparse.Namespace) -> dict:
    """Validate everything, then load, measure, prune, measure, save."""
    demo = args.model is None
    model_id = data.demo_model_path() if demo else check_model(args.model)
    dataset = args.dataset or data.demo_calibration_text()
    eval_path = args.eval_text or data.demo_eval_text()
    num_samples = _positive("--num-samples", _default(args.num_samples, 64 if demo else 128))
    seq_len = _positive("--seq-len", _default(args.seq_len, 256 if demo else 512), 2)
    _positive("--eval-window", args.eval_window, 2)
    _positive("--eval-tokens", args.eval_tokens, args.eval_window)
    output = check_output(args.output, args.overwrite)
    recipe_path = resolve_recipe(args.recipe)

    import torch

    from . import UniPruningModifier  # registers the modifier before the recipe is parsed
    from .device import PeakMemory, select_device, timed
    from .evaluation import layer_sparsity, perplexity, total_sparsity

    try:
        device = select_device(args.device)
    except ValueError as error:
        raise UsageError(f"--device: {error}") from error
    recipe = load_recipe(recipe_path)
    texts = {}
    for flag, source in (("--dataset", dataset), ("--eval-text", eval_path)):
        try:
            texts[flag] = data.read_text(source)
        except (OSError, ValueError) as error:
            raise UsageError(f"{flag}: {error}") from error

    from llmcompressor import oneshot
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    log(f"loading {model_id} on {device}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        saved_dtype = checkpoint_dtype(config) if args.dtype == "auto" else getattr(torch, args.dtype)
        compute_dtype = torch.float32 if args.dtype == "auto" and device.type == "cpu" else saved_dtype
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=compute_dtype, trust_remote_code=args.trust_remote_code
        ).to(device)
    except OSError as error:
        raise UsageError(f"--model {args.model}: cannot load it ({error})") from error

    calibration = data.calibration_dataset(tokenizer, texts["--dataset"], num_samples, seq_len, args.seed)
    eval_tokens = data.token_stream(tokenizer, texts["--eval-text"])
    if eval_tokens.numel() < args.eval_window:
        raise UsageError(f"--eval-text {eval_path}: {eval_tokens.numel()} tokens, fewer than --eval-window {args.eval_window}")
    pruners = [m for m in recipe.modifiers if isinstance(m, UniPruningModifier)]
    try:
        targets = sorted({name for m in pruners for name in m.check_model(model)[0]})
    except ValueError as error:
        raise UsageError(f"--recipe {recipe_path}: {error}") from error

    log("perplexity of the dense model")
    ppl_dense = perplexity(model, eval_tokens, args.eval_window, args.eval_tokens, progress=True)
    with PeakMemory(device) as memory, timed(device) as clock:
        model = oneshot(
            model=model,
            dataset=calibration,
            recipe=recipe,
            processor=tokenizer,
            num_calibration_samples=len(calibration),
            max_seq_length=seq_len,
            pipeline="sequential",
            shuffle_calibration_samples=False,  # windows are already drawn at random with --seed
        )
    log("perplexity of the pruned model")
    ppl_pruned = perplexity(model, eval_tokens, args.eval_window, args.eval_tokens, progress=True)
    per_layer = layer_sparsity(model, targets)

    model.to(saved_dtype)  # exact: kept weights were only upcast from this dtype
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        sparse_save = hasattr(model, "_unipruning_sparse")  # set when a UniPruningModifier pruned it
        model.save_pretrained(staging, **({"sparse_format": "dense"} if sparse_save and args.save_format == "dense" else {}))
        tokenizer.save_pretrained(staging)
        publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    return {
        "model": str(model_id),
        "recipe": recipe_path,
        "output": str(output),
        "device": str(device),
        "num_samples": len(calibration),
        "seq_len": seq_len,
        "sparsity": total_sparsity(model, targets),
        "layer_sparsity": per_layer,
        "ppl_dense": ppl_dense,
        "ppl_pruned": ppl_pruned,
        "checkpoint_mb": sum(f.stat().st_size for f in output.glob("*.safetensors")) / 2**20,
        "seconds": clock["seconds"],
        "peak_memory_mb": memory.peak_mb,
        "rss_peak_mb": memory.rss_peak_mb,
        "device_peak_mb": memory.device_peak_mb,
    }


def print_summary(result: dict) -> None:
    print(f"Pruned {result['model']} with {result['recipe']} -> {result['output']}")
    width = max((len(n) for n in result["layer_sparsity"]), default=10)
    for name, value in result["layer_sparsity"].items():
        print(f"  {name:<{width}}  {value:7.2%}")
    print(f"  {'total (target layers)':<{width}}  {result['sparsity']:7.2%}")
    print(
        f"perplexity {result['ppl_dense']:.3f} dense -> {result['ppl_pruned']:.3f} pruned; "
        f"pruning took {result['seconds']:.1f} s, peak memory {result['peak_memory_mb']:.0f} MiB "
        f"({result['num_samples']} x {result['seq_len']} calibration tokens on {result['device']})"
    )
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prune":
            print_summary(prune(args))
    except UsageError as error:
        print(f"unipruning {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
