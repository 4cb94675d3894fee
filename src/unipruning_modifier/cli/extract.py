"""``unipruning extract``: prune from a saliency file, without calibration.

Its mask options are the fields of mask_fields.MaskSettings (the same ones UniPruningModifier
takes), generated from them, so a new mask field is a new option here without another edit.
"""

from __future__ import annotations

import argparse
import typing

from ..mask_fields import MaskSettings, field_help
from .common import HelpFormatter, UsageError, add_model_options, add_output_options, log, positive, select
from .model_io import check_model_path, checkpoint_bytes, load_dtypes, load_model, load_tokenizer, save_checkpoint, skeleton
from .outputs import check_free_space, check_output, claim_outputs, output_path
from .prune import eval_tokens, print_layer_sparsity

__all__ = ["add_parser", "build_modifier", "mask_options", "print_summary", "run"]


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def mask_options(parser: argparse.ArgumentParser) -> None:
    """One option per MaskSettings field: its type, choices, default and docstring."""
    for name, info in MaskSettings.model_fields.items():
        kwargs: dict = {"default": info.default, "help": field_help(MaskSettings, name)}
        choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else None
        if choices:
            kwargs["choices"] = choices
        elif name == "sparsity":
            kwargs["type"] = float
            kwargs["help"] += " (one value here)"
        elif info.annotation is float:
            kwargs["type"] = float
        parser.add_argument(flag(name), dest=name, **kwargs)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "extract", help="prune from a saliency file, without calibration", formatter_class=HelpFormatter,
        description="Prune a model from a saliency file written by unipruning prune --save-saliency, at any sparsity, "
        "N:M pattern or allocation, without calibrating again.",
    )
    parser.add_argument(
        "--model", metavar="PATH_OR_HUB_ID", help="the model the saliency was calibrated on (default: the built-in demo model)"
    )
    parser.add_argument("--saliency", required=True, metavar="FILE", help="file written by unipruning prune --save-saliency")
    mask_options(parser)
    parser.add_argument("--output", default="pruned-model", metavar="DIR", help="folder for the pruned checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--save-format", choices=("sparse", "dense"), default="sparse",
        help="sparse: pruned layers as sparse-24-bitmask or sparse-bitmask; dense: zeros in dense tensors",
    )
    parser.add_argument("--eval-text", metavar="FILE", help="text file for perplexity (default: the built-in text)")
    parser.add_argument("--eval-window", type=int, default=512, metavar="W", help="tokens per perplexity window")
    parser.add_argument(
        "--eval-tokens", type=int, default=65536, metavar="T", help="at most this many evaluation tokens; 0 skips the evaluation"
    )
    add_model_options(parser)
    add_output_options(parser)
    parser.set_defaults(run=run, report=print_summary)


def build_modifier(args: argparse.Namespace, calibration: dict):
    """The UniPruningModifier of the mask options over the file's targets; errors name the flag."""
    from pydantic import ValidationError

    from ..modifier import UniPruningModifier

    fields = {name: getattr(args, name) for name in MaskSettings.model_fields if getattr(args, name) is not None}
    fields.update(targets=calibration["targets"], ignore=calibration["ignore"], load_saliency=args.saliency)
    try:
        return UniPruningModifier(**fields)
    except ValidationError as error:
        raise UsageError("; ".join(problem(e) for e in error.errors())) from None


def problem(error: dict) -> str:
    """One pydantic error as '--flag: message'; an error of a combination names the first
    mask field its message mentions."""
    message = error["msg"].removeprefix("Value error, ")
    field = str(error["loc"][0]) if error["loc"] else None
    if field not in MaskSettings.model_fields:
        mentioned = [(message.find(name), name) for name in MaskSettings.model_fields if name in message]
        field = min(mentioned)[1] if mentioned else None
    return f"{flag(field)}: {message}" if field else message


def check_structure(modifier, model, args: argparse.Namespace) -> list[str]:
    """The layers to prune (the file's calibration targets), after checking that N:M fits them."""
    _, m = modifier.nm
    targets = modifier.target_modules(model)
    for name, module in targets.items():
        if m and module.in_features % m:
            raise UsageError(
                f"--mask-structure {args.mask_structure}: layer {name} has {module.in_features} inputs, not a multiple of "
                f"{m}; extract prunes every layer calibrated in --saliency, so choose an M that divides each input size "
                "(or calibrate again with that layer in the recipe's ignore)"
            )
    try:
        modifier.resolve(model)
    except ValueError as error:
        raise UsageError(f"--saliency {args.saliency}: its calibration targets do not fit --model: {error}") from None
    return sorted(targets)


def run(args: argparse.Namespace) -> dict:
    """Validate everything and claim the output, then load, mask from the saliency file, measure, save."""
    from .. import data

    demo = args.model is None
    model_id = data.demo_model_path() if demo else check_model_path(args.model, args.trust_remote_code)
    if args.eval_tokens:
        positive("--eval-window", args.eval_window, 2)
        positive("--eval-tokens", args.eval_tokens, args.eval_window)
    output = output_path(args.output)

    from ..saliency_file import SaliencyFileError, read_metadata

    try:
        calibration = read_metadata(args.saliency)["calibration"]
    except SaliencyFileError as error:
        raise UsageError(f"--saliency: {error}") from None
    modifier = build_modifier(args, calibration)
    device = select(args.device)
    with claim_outputs((output, "--output")) as (claim,):
        check_output(claim, args.overwrite)
        return extract(args, model_id, modifier, device, claim)


def extract(args: argparse.Namespace, model_id: str, modifier, device, claim) -> dict:
    """Checks against config.json, then load, mask, measure and save (the output claimed)."""
    from ..device import PeakMemory, timed
    from ..evaluation import layer_sparsity, perplexity, total_sparsity
    from ..saliency_file import SaliencyFileError

    tokenizer = load_tokenizer(model_id, args)
    tokens = eval_tokens(args, tokenizer) if args.eval_tokens else None
    shapes = skeleton(model_id, args)
    targets = check_structure(modifier, shapes, args)
    saved_dtype, _ = load_dtypes(model_id, args, device)
    check_free_space([(claim.path, "--output", checkpoint_bytes(shapes, saved_dtype))])

    from llmcompressor import oneshot

    model, saved_dtype = load_model(model_id, args, device)
    with PeakMemory(device) as memory, timed(device) as clock:
        try:
            model = oneshot(model=model, recipe=[modifier])
        except SaliencyFileError as error:
            raise UsageError(f"--saliency: {error}") from None
    ppl = None
    if tokens is not None:
        log("perplexity of the pruned model")
        ppl = perplexity(model, tokens, args.eval_window, args.eval_tokens, progress=True)
    per_layer, sparsity = layer_sparsity(model, targets), total_sparsity(model, targets)
    checkpoint_mb = save_checkpoint(model, tokenizer, claim, args.save_format, saved_dtype, args.trust_remote_code)
    return {
        "model": str(model_id),
        "saliency": str(args.saliency),
        "output": str(claim.path),
        "device": str(device),
        "mask_structure": args.mask_structure,
        "allocation": args.allocation,
        "sparsity": sparsity,
        "layer_sparsity": per_layer,
        "ppl_pruned": ppl,
        "checkpoint_mb": checkpoint_mb,
        "seconds": clock["seconds"],
        "peak_memory_mb": memory.peak_mb,
        "rss_peak_mb": memory.rss_peak_mb,
        "device_peak_mb": memory.device_peak_mb,
    }


def print_summary(result: dict) -> None:
    print(f"Pruned {result['model']} with saliency {result['saliency']} -> {result['output']}")
    print_layer_sparsity(result)
    ppl = "not measured" if result["ppl_pruned"] is None else f"{result['ppl_pruned']:.3f}"
    print(
        f"perplexity {ppl}; extraction took {result['seconds']:.2f} s, peak memory "
        f"{result['peak_memory_mb']:.0f} MiB on {result['device']}"
    )
