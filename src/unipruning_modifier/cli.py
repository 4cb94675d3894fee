"""The ``unipruning`` command: prune a causal LM with a recipe and report what it cost.

``unipruning prune`` with no arguments prunes the built-in demo model on the built-in text, so
it runs offline; with ``--save-saliency`` it also keeps the calibrated saliency, from which
``unipruning extract`` prunes the same model to any other sparsity without calibrating. Every
input is checked before the model is loaded; the checkpoint is written to a temporary folder
beside ``--output`` and renamed only when complete.
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
    prune.add_argument(
        "--save-saliency", metavar="FILE",
        help="also write the calibrated saliency to FILE (safetensors; calibrates every layer on dense inputs) "
        "for `unipruning extract`",
    )

    extract = commands.add_parser("extract", help="prune from a saliency file, without calibration")
    extract.add_argument("--model", help="the model the saliency was calibrated on (default: the built-in demo model)")
    extract.add_argument("--saliency", required=True, metavar="FILE", help="file written by `prune --save-saliency`")
    extract.add_argument("--sparsity", type=float, help="fraction pruned per layer (unstructured)")
    extract.add_argument("--mask-structure", default="0:0", help="unstructured (0:0, default) or N:M, e.g. 2:4")
    extract.add_argument("--allocation", choices=("layer", "row", "global", "owl"), default="layer", help="unstructured budget")
    extract.add_argument("--clamp", type=float, default=0.1, help="per-layer deviation allowed by --allocation global")
    extract.add_argument("--owl-lambda", type=float, default=0.08, help="per-decoder-layer sparsity range under --allocation owl")
    extract.add_argument("--nm-order", choices=("gamma", "first_step"), default="gamma", help="N:M ranking")
    extract.add_argument("--output", default="pruned-model", help="folder for the pruned checkpoint")
    extract.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    extract.add_argument("--save-format", choices=("sparse", "dense"), default="sparse", help="as for prune")
    extract.add_argument("--eval-text", help="text file for perplexity (default: built-in text)")
    extract.add_argument("--eval-window", type=int, default=512, help="tokens per perplexity window")
    extract.add_argument("--eval-tokens", type=int, default=65536, help="at most this many eval tokens (0: skip)")
    extract.add_argument("--device", help="cuda, cuda:N, npu, cpu (default: best available)")
    extract.add_argument("--dtype", choices=DTYPES, default="auto", help="load dtype (auto: fp32 on CPU)")
    extract.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")

    evaluate = commands.add_parser("eval", help="zero-shot tasks and perplexity with lm-eval-harness")
    evaluate.add_argument("--model", required=True, help="checkpoint folder (sparse formats included) or hub id")
    evaluate.add_argument(
        "--tasks", required=True,
        help="comma-separated: lm-eval task names (wikitext, arc_easy, hellaswag, piqa, winogrande, boolq, rte, "
        "openbookqa, ...), text:PATH (perplexity of a text file), unipruning_demo_ppl, unipruning_demo_mc",
    )
    evaluate.add_argument("--limit", type=int, help="at most this many documents per task")
    evaluate.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", help="cuda, cuda:N, npu, cpu (default: best available)")
    evaluate.add_argument("--dtype", choices=DTYPES, default="auto", help="load dtype (auto: fp32 on CPU)")
    evaluate.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
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


def check_saliency_output(value: str, overwrite: bool) -> str:
    path = Path(value).expanduser().resolve()
    if path.exists() and not overwrite:
        raise UsageError(f"--save-saliency {value} exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise UsageError(f"--save-saliency {value}: folder {path.parent} does not exist")
    return str(path)


def with_saved_saliency(recipe, path: str, recipe_path: str):
    """The recipe's single UniPruningModifier set to write its saliency to ``path``."""
    from . import UniPruningModifier

    indices = [i for i, m in enumerate(recipe.modifiers) if isinstance(m, UniPruningModifier)]
    if len(indices) != 1:
        raise UsageError(f"--save-saliency needs exactly one UniPruningModifier in --recipe {recipe_path}, found {len(indices)}")
    index = indices[0]
    fields = recipe.modifiers[index].model_dump(exclude_unset=True)
    fields.pop("calibration_inputs", None)
    # a saliency file serves any sparsity: every layer calibrates on the dense model's activations,
    # so there is no drift to correct and no mask yet to take feedback from
    fields.pop("dense_target", None)
    fields.pop("block_feedback", None)
    try:
        recipe.modifiers[index] = UniPruningModifier.model_validate({**fields, "save_saliency": path})
    except ValueError as error:
        raise UsageError(f"--save-saliency with --recipe {recipe_path}: {error}") from error
    return recipe


def select(device_flag):
    from .device import select_device

    try:
        return select_device(device_flag)
    except ValueError as error:
        raise UsageError(f"--device: {error}") from error


def load_dtypes(model_id: str, args: argparse.Namespace, device):
    """(dtype to save in, dtype to compute in): ``--dtype``, or for auto the checkpoint's own,
    computed in fp32 on the CPU."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
    saved_dtype = checkpoint_dtype(config) if args.dtype == "auto" else getattr(torch, args.dtype)
    compute_dtype = torch.float32 if args.dtype == "auto" and device.type == "cpu" else saved_dtype
    return saved_dtype, compute_dtype


def load_model(model_id: str, args: argparse.Namespace, device):
    """(model, tokenizer, dtype to save in): fp32 compute on the CPU for ``--dtype auto``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading {model_id} on {device}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        saved_dtype, compute_dtype = load_dtypes(model_id, args, device)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=compute_dtype, trust_remote_code=args.trust_remote_code
        ).to(device)
    except OSError as error:
        raise UsageError(f"--model {args.model}: cannot load it ({error})") from error
    return model, tokenizer, saved_dtype


def save_checkpoint(model, tokenizer, output: Path, save_format: str, saved_dtype) -> float:
    """Write the checkpoint to a private staging folder, then move it to ``output``; its MiB."""
    from .checkpoint import save_sparse

    model.to(saved_dtype)  # exact: kept weights were only upcast from this dtype
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        save_sparse(model, staging, sparse_format="dense" if save_format == "dense" else None)
        tokenizer.save_pretrained(staging)
        publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sum(f.stat().st_size for f in output.glob("*.safetensors")) / 2**20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    saliency_path = check_saliency_output(args.save_saliency, args.overwrite) if args.save_saliency else None
    recipe_path = resolve_recipe(args.recipe)

    from . import UniPruningModifier  # registers the modifier before the recipe is parsed
    from .device import PeakMemory, timed
    from .evaluation import layer_sparsity, perplexity, total_sparsity

    device = select(args.device)
    recipe = load_recipe(recipe_path)
    if saliency_path:
        recipe = with_saved_saliency(recipe, saliency_path, recipe_path)
    texts = {}
    for flag, source in (("--dataset", dataset), ("--eval-text", eval_path)):
        try:
            texts[flag] = data.read_text(source)
        except (OSError, ValueError) as error:
            raise UsageError(f"{flag}: {error}") from error

    from llmcompressor import oneshot

    model, tokenizer, saved_dtype = load_model(model_id, args, device)
    calibration = data.calibration_dataset(tokenizer, texts["--dataset"], num_samples, seq_len, args.seed)
    eval_tokens = data.token_stream(tokenizer, texts["--eval-text"])
    if eval_tokens.numel() < args.eval_window:
        raise UsageError(f"--eval-text {eval_path}: {eval_tokens.numel()} tokens, fewer than --eval-window {args.eval_window}")
    pruners = [m for m in recipe.modifiers if isinstance(m, UniPruningModifier)]
    try:
        targets = sorted({name for m in pruners for name in m.resolve(model)[0]})
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

    checkpoint_mb = save_checkpoint(model, tokenizer, output, args.save_format, saved_dtype)
    return {
        "model": str(model_id),
        "recipe": recipe_path,
        "output": str(output),
        "saliency": saliency_path,
        "device": str(device),
        "num_samples": len(calibration),
        "seq_len": seq_len,
        "sparsity": total_sparsity(model, targets),
        "layer_sparsity": per_layer,
        "ppl_dense": ppl_dense,
        "ppl_pruned": ppl_pruned,
        "checkpoint_mb": checkpoint_mb,
        "seconds": clock["seconds"],
        "peak_memory_mb": memory.peak_mb,
        "rss_peak_mb": memory.rss_peak_mb,
        "device_peak_mb": memory.device_peak_mb,
    }


def extract(args: argparse.Namespace) -> dict:
    """Validate everything, then load, mask from the saliency file, measure, save."""
    demo = args.model is None
    model_id = data.demo_model_path() if demo else check_model(args.model)
    eval_path = args.eval_text or data.demo_eval_text()
    if args.eval_tokens:
        _positive("--eval-window", args.eval_window, 2)
        _positive("--eval-tokens", args.eval_tokens, args.eval_window)
    output = check_output(args.output, args.overwrite)

    from pydantic import ValidationError

    from . import UniPruningModifier
    from .device import PeakMemory, timed
    from .evaluation import layer_sparsity, perplexity, total_sparsity
    from .saliency_file import SaliencyFileError, read_metadata

    try:
        calibration = read_metadata(args.saliency)["calibration"]
    except (SaliencyFileError, KeyError) as error:
        raise UsageError(f"--saliency: {error}") from error
    fields = {
        "mask_structure": args.mask_structure,
        "allocation": args.allocation,
        "clamp": args.clamp,
        "owl_lambda": args.owl_lambda,
        "nm_order": args.nm_order,
        "targets": calibration["targets"],
        "ignore": calibration["ignore"],
        "load_saliency": args.saliency,
    }
    if args.sparsity is not None:
        fields["sparsity"] = args.sparsity
    try:
        modifier = UniPruningModifier(**fields)
    except ValidationError as error:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-') or 'arguments'}: {e['msg']}" for e in error.errors())
        raise UsageError(problems) from error
    device = select(args.device)
    eval_text = None
    if args.eval_tokens:
        try:
            eval_text = data.read_text(eval_path)
        except (OSError, ValueError) as error:
            raise UsageError(f"--eval-text: {error}") from error

    from llmcompressor import oneshot

    model, tokenizer, saved_dtype = load_model(model_id, args, device)
    try:
        targets = sorted(modifier.resolve(model)[0])
    except ValueError as error:
        raise UsageError(f"--mask-structure {args.mask_structure}: {error}") from error
    with PeakMemory(device) as memory, timed(device) as clock:
        try:
            model = oneshot(model=model, recipe=[modifier])
        except SaliencyFileError as error:
            raise UsageError(f"--saliency: {error}") from error
    ppl = None
    if eval_text is not None:
        log("perplexity of the pruned model")
        ppl = perplexity(model, data.token_stream(tokenizer, eval_text), args.eval_window, args.eval_tokens, progress=True)
    per_layer = layer_sparsity(model, targets)
    checkpoint_mb = save_checkpoint(model, tokenizer, output, args.save_format, saved_dtype)
    return {
        "model": str(model_id),
        "saliency": str(args.saliency),
        "output": str(output),
        "device": str(device),
        "mask_structure": args.mask_structure,
        "allocation": args.allocation,
        "sparsity": total_sparsity(model, targets),
        "layer_sparsity": per_layer,
        "ppl_pruned": ppl,
        "checkpoint_mb": checkpoint_mb,
        "seconds": clock["seconds"],
        "peak_memory_mb": memory.peak_mb,
        "rss_peak_mb": memory.rss_peak_mb,
        "device_peak_mb": memory.device_peak_mb,
    }


def evaluate(args: argparse.Namespace) -> dict:
    """Validate the tasks, load the checkpoint (sparse formats decompressed), run lm-eval."""
    import time
    from importlib.util import find_spec

    if find_spec("lm_eval") is None:
        raise UsageError("lm-eval is not installed: pip install 'unipruning-modifier[eval]'")
    model_id = check_model(args.model)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks: give at least one task")
    if args.limit is not None:
        _positive("--limit", args.limit)
    _positive("--batch-size", args.batch_size)
    device = select(args.device)

    from .lm_evaluation import evaluate as run_tasks
    from .lm_evaluation import task_specs

    with tempfile.TemporaryDirectory(prefix="unipruning-tasks-") as folder:  # local tasks' data files
        try:
            specs = task_specs(tasks, Path(folder))
        except (OSError, ValueError) as error:
            raise UsageError(f"--tasks: {error}") from error
        model, tokenizer, sparse = load_for_eval(model_id, args, device)
        start = time.perf_counter()
        results = run_tasks(model, tokenizer, specs, batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot)
    return {
        "model": str(model_id),
        "sparsity_config": sparse,
        "device": str(device),
        "limit": args.limit,
        "tasks": results,
        "seconds": time.perf_counter() - start,
    }


def load_for_eval(model_id: str, args: argparse.Namespace, device):
    """(model on ``device``, tokenizer, sparsity_config or None); sparse folders via load_sparse."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import load_sparse, sparse_config_of

    log(f"loading {model_id} on {device}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        local = Path(model_id).is_dir()
        sparse = sparse_config_of(model_id) if local else None
        _, dtype = load_dtypes(model_id, args, device)
        if local:
            model = load_sparse(model_id, dtype=dtype, trust_remote_code=args.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, trust_remote_code=args.trust_remote_code)
    except OSError as error:
        raise UsageError(f"--model {args.model}: cannot load it ({error})") from error
    return model.to(device).eval(), tokenizer, sparse


def print_summary(result: dict) -> None:
    source = result["recipe"] if "recipe" in result else f"saliency {result['saliency']}"
    print(f"Pruned {result['model']} with {source} -> {result['output']}")
    width = max((len(n) for n in result["layer_sparsity"]), default=10)
    for name, value in result["layer_sparsity"].items():
        print(f"  {name:<{width}}  {value:7.2%}")
    print(f"  {'total (target layers)':<{width}}  {result['sparsity']:7.2%}")
    if "ppl_dense" in result:
        print(
            f"perplexity {result['ppl_dense']:.3f} dense -> {result['ppl_pruned']:.3f} pruned; "
            f"pruning took {result['seconds']:.1f} s, peak memory {result['peak_memory_mb']:.0f} MiB "
            f"({result['num_samples']} x {result['seq_len']} calibration tokens on {result['device']})"
        )
    else:
        ppl = "not measured" if result["ppl_pruned"] is None else f"{result['ppl_pruned']:.3f}"
        print(f"perplexity {ppl}; extraction took {result['seconds']:.2f} s, peak memory "
              f"{result['peak_memory_mb']:.0f} MiB on {result['device']}")
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "eval":
            result = evaluate(args)
            for task, metrics in result["tasks"].items():
                shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not k.endswith("stderr") and k != "sample_len")
                print(f"{task}: {shown}")
            print(json.dumps(result), flush=True)
        else:
            print_summary(prune(args) if args.command == "prune" else extract(args))
    except UsageError as error:
        print(f"unipruning {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
