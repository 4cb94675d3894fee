"""Golden hashes: a fixed matrix of prunes of the demo model, reduced to per-tensor sha256.

``tests/test_golden.py`` recomputes every case and compares with ``tests/golden.json``, so a
refactor that changes a single mask bit or weight bit fails. An intended behaviour change
regenerates the file in its own commit, with the reason in the message:

    python -m tests.golden --write

Hashes are of bytes, so they are only comparable on the platform that wrote them: the file
records torch's version and CPU capability, and the test skips (saying why) elsewhere. Cases run
on one torch thread so that the machine's core count does not change reduction orders.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "golden.json"
IGNORE = ["re:.*lm_head"]
NUM_SAMPLES, SEQ_LEN = 8, 64

# name -> UniPruningModifier fields (a "recipe" key names a built-in recipe file instead)
CASES: dict[str, dict] = {
    "layer-0.5": {"sparsity": 0.5},
    "row-0.5": {"sparsity": 0.5, "allocation": "row"},
    "global-0.6": {"sparsity": 0.6, "allocation": "global"},
    "owl-0.7": {"sparsity": 0.7, "allocation": "owl", "owl_threshold": 3.0},
    "2:4-gamma": {"mask_structure": "2:4"},
    "2:4-first_step": {"mask_structure": "2:4", "nm_order": "first_step"},
    "4:8-gamma": {"mask_structure": "4:8"},
    "4:8-first_step": {"mask_structure": "4:8", "nm_order": "first_step"},
    "least_squares-dense_target": {"sparsity": 0.6, "kappa": 0.1, "reconstruct": "least_squares", "dense_target": 0.3},
    "least_squares-2:4": {"mask_structure": "2:4", "reconstruct": "least_squares"},
    "block_feedback": {"sparsity": 0.6, "block_feedback": 0.5, "block_feedback_every": 2},
    "per-layer-list": {"sparsity": [0.3, 0.5, 0.6, 0.7], "allocation": "row"},
    "recipe-uni_24_fp8": {"recipe": "uni_24_fp8"},
    "recipe-uni_24_w8a8": {"recipe": "uni_24_w8a8"},
}
# settings extracted from one saliency file (calibrated once, on dense inputs)
EXTRACTED: dict[str, dict] = {
    "extract-0.7": {"sparsity": 0.7},
    "extract-global-0.6": {"sparsity": 0.6, "allocation": "global"},
    "extract-owl-0.7": {"sparsity": 0.7, "allocation": "owl", "owl_threshold": 3.0},
    "extract-2:4-first_step": {"mask_structure": "2:4", "nm_order": "first_step"},
}
SAVED = ("2:4-gamma", "layer-0.5", "recipe-uni_24_fp8")  # cases whose checkpoint files are hashed too


def platform() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def digest(tensor: torch.Tensor) -> str:
    """sha256 (16 hex digits) of a tensor's dtype, shape and bytes."""
    data = tensor.detach().cpu().contiguous()
    raw = data.view(torch.uint8) if data.numel() else data.to(torch.uint8)
    header = f"{data.dtype}:{tuple(data.shape)}:".encode()
    return hashlib.sha256(header + raw.numpy().tobytes()).hexdigest()[:16]


def model_hashes(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter and buffer, and the nonzero mask of every Linear weight."""
    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        out[name] = digest(tensor)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[f"{name}.mask"] = digest(module.weight != 0)
    return out


def folder_hashes(folder: Path) -> dict[str, str]:
    """Every tensor of every safetensors file, and config.json's quantization_config."""
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                out[f"{path.name}:{key}"] = digest(handle.get_tensor(key))
    config = json.loads((folder / "config.json").read_text()).get("quantization_config")
    out["config.json:quantization_config"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return out


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _load():
    from transformers import AutoModelForCausalLM

    from unipruning_modifier import data

    return AutoModelForCausalLM.from_pretrained(data.demo_model_path(), dtype=torch.float32)


def _calibration():
    from transformers import AutoTokenizer

    from unipruning_modifier import data

    tokenizer = AutoTokenizer.from_pretrained(data.demo_model_path())
    text = data.read_text(data.demo_calibration_text())
    return tokenizer, data.calibration_dataset(tokenizer, text, NUM_SAMPLES, SEQ_LEN)


def _recipe(fields: dict):
    from unipruning_modifier import UniPruningModifier
    from unipruning_modifier.cli import BUILTIN_RECIPES

    if "recipe" in fields:
        return str(BUILTIN_RECIPES / f"{fields['recipe']}.yaml")
    return UniPruningModifier(ignore=IGNORE, **fields)


def _prune(recipe, tokenizer, calibration):
    from llmcompressor import oneshot

    return oneshot(
        model=_load(),
        dataset=calibration,
        recipe=recipe,
        processor=tokenizer,
        num_calibration_samples=len(calibration),
        max_seq_length=SEQ_LEN,
        pipeline="sequential",
        shuffle_calibration_samples=False,
    )


def compute(names: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Hashes of the named cases (default: all), keyed by case."""
    import unipruning_modifier  # noqa: F401  (registers the modifiers)
    from llmcompressor import oneshot

    from unipruning_modifier import UniPruningModifier

    wanted = set(names or [*CASES, *EXTRACTED, "saliency-file", *(f"saved-{c}" for c in SAVED)])
    results: dict[str, dict[str, str]] = {}
    with one_thread(), tempfile.TemporaryDirectory() as tmp:
        tokenizer, calibration = _calibration()
        for name, fields in CASES.items():
            if name not in wanted and f"saved-{name}" not in wanted:
                continue
            model = _prune(_recipe(fields), tokenizer, calibration)
            results[name] = model_hashes(model)
            if name in SAVED:
                folder = Path(tmp) / name.replace(":", "_")
                model.save_pretrained(folder)
                results[f"saved-{name}"] = folder_hashes(folder)
        if wanted & {"saliency-file", *EXTRACTED}:
            path = Path(tmp) / "demo.saliency.safetensors"
            _prune(UniPruningModifier(sparsity=0.5, ignore=IGNORE, save_saliency=str(path)), tokenizer, calibration)
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                results["saliency-file"] = {key: digest(handle.get_tensor(key)) for key in handle.keys()}
            for name, fields in EXTRACTED.items():
                recipe = UniPruningModifier(load_saliency=str(path), ignore=IGNORE, **fields)
                results[name] = model_hashes(oneshot(model=_load(), recipe=recipe))
    return {name: hashes for name, hashes in results.items() if name in wanted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN.name}")
    args = parser.parse_args()
    cases = compute()
    if args.write:
        GOLDEN.write_text(json.dumps({"platform": platform(), "cases": cases}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(cases)} cases to {GOLDEN}")
    else:
        print(json.dumps({"platform": platform(), "cases": cases}, sort_keys=True))


if __name__ == "__main__":
    main()
