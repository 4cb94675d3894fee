"""``unipruning prune``: prune a model with a recipe, measure it, save the checkpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import launch
from .common import HelpFormatter, UsageError, add_model_options, add_output_options, log, positive, select
from .model_io import (
    check_model_path,
    checkpoint_bytes,
    load_dtypes,
    load_model,
    load_tokenizer,
    save_checkpoint,
    skeleton,
)
from .outputs import check_free_space, check_output, claim_outputs, output_path
from .recipes import check_fits, load_recipe, resolve_recipe

__all__ = ["add_parser", "eval_tokens", "print_summary", "run"]


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "prune", help="prune a model with a recipe and save it", formatter_class=HelpFormatter,
        description="Prune a model with a recipe, measure perplexity before and after, and save the sparse checkpoint.",
    )
    parser.add_argument("--model", metavar="PATH_OR_HUB_ID", help="local folder or hub id (default: the built-in demo model)")
    parser.add_argument(
        "--recipe", default="uni_24", metavar="FILE_OR_NAME",
        help="YAML file or built-in recipe name; unipruning recipes lists them",
    )
    parser.add_argument(
        "--dataset", metavar="TEXT_FILE_OR_HF_NAME",
        help="calibration text file or Hugging Face dataset name[:config] (default: the built-in text)",
    )
    parser.add_argument("--eval-text", metavar="FILE", help="held-out text file for perplexity (default: the built-in text)")
    parser.add_argument("--output", default="pruned-model", metavar="DIR", help="folder for the pruned checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace --output (and --save-saliency) if it exists")
    parser.add_argument(
        "--save-format", choices=("sparse", "dense"), default="sparse",
        help="sparse: pruned layers as sparse-24-bitmask or sparse-bitmask; dense: zeros in dense tensors",
    )
    parser.add_argument("--num-samples", type=int, metavar="N", help="calibration windows (default: 128; 64 for the demo model)")
    parser.add_argument("--seq-len", type=int, metavar="L", help="tokens per window (default: 512; 256 for the demo model)")
    parser.add_argument("--eval-window", type=int, default=512, metavar="W", help="tokens per perplexity window")
    parser.add_argument("--eval-tokens", type=int, default=65536, metavar="T", help="at most this many evaluation tokens")
    add_model_options(parser)
    launch.add_option(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of calibration windows")
    parser.add_argument(
        "--save-saliency", metavar="FILE",
        help="also write the calibrated saliency to FILE (safetensors; calibrates every layer on dense inputs) "
        "for unipruning extract",
    )
    add_output_options(parser)
    parser.set_defaults(run=run, report=print_summary)


def check_saliency_output(value: str) -> Path:
    path = Path(value).expanduser().resolve()
    if path.is_dir():
        raise UsageError(f"--save-saliency {value} is a folder; give a file name (e.g. model.saliency.safetensors)")
    if not path.parent.is_dir():
        raise UsageError(f"--save-saliency {value}: folder {path.parent} does not exist")
    return path


def saliency_bytes(model, targets: list[str]) -> int:
    """An upper bound of the saliency file's size (saliency_file.estimated_bytes)."""
    from ..saliency_file import estimated_bytes

    modules = dict(model.named_modules())
    return estimated_bytes([tuple(modules[name].weight.shape) for name in targets])


def read_text(flag: str, source: str) -> str:
    from .. import data

    try:
        return data.read_text(source)
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag}: {error}") from None


def eval_tokens(args: argparse.Namespace, tokenizer):
    """``--eval-text`` (default: the built-in text) as tokens, at least one ``--eval-window``."""
    from .. import data

    source = args.eval_text or data.demo_eval_text()
    tokens = data.token_stream(tokenizer, read_text("--eval-text", source))
    if tokens.numel() < args.eval_window:
        raise UsageError(f"--eval-text {source}: {tokens.numel()} tokens, fewer than --eval-window {args.eval_window}")
    return tokens


def read_texts(args: argparse.Namespace, tokenizer, num_samples: int, seq_len: int):
    """(calibration windows of ``--dataset``, evaluation tokens), checked before the model loads."""
    from .. import data

    source = args.dataset or data.demo_calibration_text()
    tokens = data.token_stream(tokenizer, read_text("--dataset", source))
    available = tokens.numel() // seq_len
    if available == 0:
        raise UsageError(
            f"--dataset {source}: {tokens.numel()} tokens, fewer than one window of --seq-len {seq_len}; "
            "give a longer text or a smaller --seq-len"
        )
    if available < num_samples:
        log(f"--dataset {source}: {tokens.numel()} tokens make {available} windows of {seq_len}, fewer than --num-samples {num_samples}")
    windows = data.calibration_windows(tokens, num_samples, seq_len, args.seed)
    return data.windows_dataset(windows), eval_tokens(args, tokenizer)


def with_saved_saliency(recipe, path: str, recipe_path: str):
    """The recipe's single UniPruningModifier set to write its saliency to ``path``."""
    from ..modifier import UniPruningModifier

    indices = [i for i, m in enumerate(recipe.modifiers) if isinstance(m, UniPruningModifier)]
    if len(indices) != 1:
        raise UsageError(f"--save-saliency needs exactly one UniPruningModifier in --recipe {recipe_path}, found {len(indices)}")
    index = indices[0]
    fields = recipe.modifiers[index].model_dump(exclude_unset=True)
    fields.pop("calibration_inputs", None)
    # a saliency file serves any sparsity: every layer calibrates on the dense model's activations,
    # so there is no drift to correct, no mask yet to take feedback from and no masked layer to tune
    for field in ("dense_target", "block_feedback", "block_tune_epochs", "block_tune_target"):
        fields.pop(field, None)
    try:
        recipe.modifiers[index] = UniPruningModifier.model_validate({**fields, "save_saliency": path})
    except ValueError as error:
        raise UsageError(f"--save-saliency with --recipe {recipe_path}: {error}") from error
    return recipe


def run(args: argparse.Namespace) -> dict:
    """Validate everything and claim the outputs, then load, measure, prune, measure, save
    (with ``--nproc``: start the workers; in a worker of rank > 0: calibrate only)."""
    from .. import data

    nproc = positive("--nproc", args.nproc)
    if args.save_saliency and (nproc > 1 or launch.is_worker()):
        raise UsageError("--save-saliency calibrates in one process; drop --nproc")
    if nproc > 1 and not launch.is_worker():
        return launch.launch(nproc, args.argv)
    demo = args.model is None
    num_samples = positive("--num-samples", (64 if demo else 128) if args.num_samples is None else args.num_samples)
    seq_len = positive("--seq-len", (256 if demo else 512) if args.seq_len is None else args.seq_len, 2)
    positive("--eval-window", args.eval_window, 2)
    positive("--eval-tokens", args.eval_tokens, args.eval_window)
    model_id = data.demo_model_path() if demo else check_model_path(args.model, args.trust_remote_code)
    output = output_path(args.output)
    saliency_path = check_saliency_output(args.save_saliency) if args.save_saliency else None
    if saliency_path is not None and saliency_path.is_relative_to(output):
        raise UsageError(f"--save-saliency {args.save_saliency} is inside --output {args.output}, which is replaced as a whole")
    recipe_path = resolve_recipe(args.recipe)
    if launch.is_worker() and int(os.environ["RANK"]) > 0:  # rank 0 claims and writes the outputs
        return prune(args, model_id, recipe_path, num_samples, seq_len, None, None)
    with claim_outputs((output, "--output"), (saliency_path, "--save-saliency")) as (claim, saliency_claim):
        check_output(claim, args.overwrite)
        if saliency_claim is not None and saliency_path.exists() and not args.overwrite:
            raise UsageError(f"--save-saliency {args.save_saliency} exists (pass --overwrite to replace it)")
        return prune(args, model_id, recipe_path, num_samples, seq_len, claim, saliency_claim)


def prune(args, model_id: str, recipe_path: str, num_samples: int, seq_len: int, claim, saliency_claim) -> dict | None:
    """The checks that read the recipe, texts and config.json, then the work (outputs claimed;
    ``claim`` None: a worker of rank > 0, which only calibrates on its slice and returns None)."""
    from ..modifier import UniPruningModifier  # imported before the recipe is parsed, which names it
    from ..device import PeakMemory, timed
    from ..distributed import rank_slice, world
    from ..evaluation import layer_sparsity, perplexity, total_sparsity
    from ..saliency_file import SaliencyFileError

    device = select(args.device)
    if launch.is_worker():
        device = launch.join(device)
    recipe = load_recipe(recipe_path)
    staged_saliency = saliency_claim.partial(".safetensors") if saliency_claim else None
    if staged_saliency:
        recipe = with_saved_saliency(recipe, str(staged_saliency), recipe_path)
    tokenizer = load_tokenizer(model_id, args)
    calibration, tokens = read_texts(args, tokenizer, num_samples, seq_len)
    windows, nproc = len(calibration), world()[1]
    if nproc > 1:  # each rank its own slice: llm-compressor 0.14 splits one dataset wrongly (docs/distributed.md)
        calibration = calibration.select(rank_slice(windows))
    shapes = skeleton(model_id, args)
    targets = check_fits(recipe.modifiers, shapes, f"--recipe {recipe_path}")
    saved_dtype, _ = load_dtypes(model_id, args, device)
    if claim is not None:
        needs = [(claim.path, "--output", checkpoint_bytes(shapes, saved_dtype))]
        if saliency_claim:
            needs.append((saliency_claim.path, "--save-saliency", saliency_bytes(shapes, targets)))
        check_free_space(needs)

    from llmcompressor import oneshot

    model, saved_dtype = load_model(model_id, args, device)
    if claim is not None:
        log("perplexity of the dense model")
        ppl_dense = perplexity(model, tokens, args.eval_window, args.eval_tokens, progress=True)
    with PeakMemory(device) as memory, timed(device) as clock:
        try:
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
        except SaliencyFileError as error:  # writing it failed
            raise UsageError(f"--save-saliency {saliency_claim.path}: {error}; nothing was replaced") from None
    launch.leave()
    if claim is None:
        return None
    log("perplexity of the pruned model")
    ppl_pruned = perplexity(model, tokens, args.eval_window, args.eval_tokens, progress=True)
    per_layer, sparsity = layer_sparsity(model, targets), total_sparsity(model, targets)
    checkpoint_mb = save_checkpoint(model, tokenizer, claim, args.save_format, saved_dtype, args.trust_remote_code)
    if staged_saliency:
        saliency_claim.publish(staged_saliency)
    return {
        "model": str(model_id),
        "recipe": recipe_path,
        "output": str(claim.path),
        "saliency": str(saliency_claim.path) if saliency_claim else None,
        "device": str(device),
        "num_samples": windows,
        "seq_len": seq_len,
        "nproc": nproc,
        "sparsity": sparsity,
        "layer_sparsity": per_layer,
        "ppl_dense": ppl_dense,
        "ppl_pruned": ppl_pruned,
        "checkpoint_mb": checkpoint_mb,
        "seconds": clock["seconds"],
        "peak_memory_mb": memory.peak_mb,
        "rss_peak_mb": memory.rss_peak_mb,
        "device_peak_mb": memory.device_peak_mb,
    }


def print_layer_sparsity(result: dict) -> None:
    """The per-layer table and the total, shared with ``extract``'s report."""
    width = max((len(n) for n in result["layer_sparsity"]), default=10)
    for name, value in result["layer_sparsity"].items():
        print(f"  {name:<{width}}  {value:7.2%}")
    print(f"  {'total (target layers)':<{width}}  {result['sparsity']:7.2%}")


def print_summary(result: dict) -> None:
    print(f"Pruned {result['model']} with {result['recipe']} -> {result['output']}")
    print_layer_sparsity(result)
    print(
        f"perplexity {result['ppl_dense']:.3f} dense -> {result['ppl_pruned']:.3f} pruned; "
        f"pruning took {result['seconds']:.1f} s, peak memory {result['peak_memory_mb']:.0f} MiB "
        f"({result['num_samples']} x {result['seq_len']} calibration tokens on {result['device']}"
        f"{f' in {nproc} processes' if (nproc := result.get('nproc', 1)) > 1 else ''})"
    )
