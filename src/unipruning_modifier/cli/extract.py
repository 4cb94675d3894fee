"""``unipruning extract``: prune from a saliency file, without calibration.

Its mask options are the fields of mask_fields.MaskSettings (the same ones UniPruningModifier
takes), generated from them, so a new mask field is a new option here without another edit.
"""

from __future__ import annotations

import argparse
import typing

from .. import data
from ..mask_fields import MaskSettings, field_help
from .common import UsageError, add_model_options, log, positive, select
from .model_io import check_model_path, check_output, load_model, save_checkpoint
from .prune import print_layer_sparsity

__all__ = ["add_parser", "mask_options", "print_summary", "run"]


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
        "extract", help="prune from a saliency file, without calibration",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", help="the model the saliency was calibrated on (default: the built-in demo model)")
    parser.add_argument("--saliency", required=True, metavar="FILE", help="file written by unipruning prune --save-saliency")
    mask_options(parser)
    parser.add_argument("--output", default="pruned-model", help="folder for the pruned checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--save-format", choices=("sparse", "dense"), default="sparse", help="as for prune")
    parser.add_argument("--eval-text", help="text file for perplexity (default: built-in text)")
    parser.add_argument("--eval-window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="at most this many eval tokens (0: skip)")
    add_model_options(parser)
    parser.set_defaults(run=run, report=print_summary)


def run(args: argparse.Namespace) -> dict:
    """Validate everything, then load, mask from the saliency file, measure, save."""
    demo = args.model is None
    model_id = data.demo_model_path() if demo else check_model_path(args.model)
    eval_path = args.eval_text or data.demo_eval_text()
    if args.eval_tokens:
        positive("--eval-window", args.eval_window, 2)
        positive("--eval-tokens", args.eval_tokens, args.eval_window)
    output = check_output(args.output, args.overwrite)

    from pydantic import ValidationError

    from ..modifier import UniPruningModifier
    from ..device import PeakMemory, timed
    from ..evaluation import layer_sparsity, perplexity, total_sparsity
    from ..saliency_file import SaliencyFileError, read_metadata

    try:
        calibration = read_metadata(args.saliency)["calibration"]
    except (SaliencyFileError, KeyError) as error:
        raise UsageError(f"--saliency: {error}") from error
    fields = {name: getattr(args, name) for name in MaskSettings.model_fields if getattr(args, name) is not None}
    fields.update(targets=calibration["targets"], ignore=calibration["ignore"], load_saliency=args.saliency)
    try:
        modifier = UniPruningModifier(**fields)
    except ValidationError as error:
        problems = "; ".join(
            (f"{flag(str(e['loc'][0]))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ") for e in error.errors()
        )
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


def print_summary(result: dict) -> None:
    print(f"Pruned {result['model']} with saliency {result['saliency']} -> {result['output']}")
    print_layer_sparsity(result)
    ppl = "not measured" if result["ppl_pruned"] is None else f"{result['ppl_pruned']:.3f}"
    print(
        f"perplexity {ppl}; extraction took {result['seconds']:.2f} s, peak memory "
        f"{result['peak_memory_mb']:.0f} MiB on {result['device']}"
    )
