"""Byte-for-byte compatibility with the real compressed-tensors 0.14.0.1 (the last release with
sparse-24-bitmask / sparse-bitmask).

compressed-tensors 0.14.0.1 pins transformers<5, so it cannot live in this environment. A
session fixture builds a throwaway virtualenv in a temp dir:
  1. ``python -m venv --system-site-packages`` + ``pip install --no-deps compressed-tensors==0.14.0.1``
     (its sparse compressors import fine beside transformers 5; about 10 s), else
  2. a clean venv with ``pip install torch==2.13.0 compressed-tensors==0.14.0.1 psutil``.
Set UNIPRUNING_CT014_PYTHON to the python of such an environment to reuse one (CI cache), or
UNIPRUNING_CT014_CLEAN=1 to go straight to the clean venv (about 70 s more).
The test skips (with the reason) when pip cannot reach the package registry.

In that venv a script runs compressed-tensors' own codecs on tensors we save with safetensors:
(a) ``Sparse24BitMaskTensor.from_dense`` / ``BitmaskTensor.from_dense`` and the state-dict
compressors, compared with our output byte for byte; (b) its ``from_compressed_data(...).decompress()``
/ ``BitmaskTensor(...).decompress()`` / ``decompress_from_state_dict`` on OUR compressed tensors,
compared with the original dense tensors; (c) its config classes parse our sparsity_config.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unipruning_modifier.checkpoint import (
    compress_sparse_24_bitmask,
    compress_sparse_bitmask,
    compress_state_dict,
    load_sparse_state_dict,
    sparsity_config,
    unpack_bitmask,
    write_sparse,
)

from .test_checkpoint_codecs import INT_VIEW, llama_like_state_dict, make_24, make_unstructured, raw

CT_VERSION = "0.14.0.1"
NETWORK_ERRORS = re.compile(
    r"No matching distribution|Could not find a version|NewConnectionError|ConnectionError|"
    r"Max retries exceeded|Temporary failure in name resolution|Network is unreachable|"
    r"Name or service not known|ReadTimeoutError|ProxyError|SSLError",
    re.I,
)
PROBE = textwrap.dedent(
    f"""
    import compressed_tensors
    from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import Sparse24BitMaskTensor
    from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import BitmaskTensor
    assert compressed_tensors.__version__ == "{CT_VERSION}", compressed_tensors.__version__
    """
)

# Runs inside the compressed-tensors 0.14.0.1 venv.
CT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import (
        Sparse24BitMaskCompressor, Sparse24BitMaskTensor)
    from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import (
        BitmaskCompressor, BitmaskTensor)
    from compressed_tensors.config import SparsityCompressionConfig, Sparse24BitMaskConfig, BitmaskConfig

    job = json.load(open(sys.argv[1]))
    inputs = load_file(job["inputs"])
    out, errors = {}, {}

    def group(prefix):
        cases = {}
        for key, value in inputs.items():
            if key.startswith(prefix):
                case, param = key[len(prefix):].rsplit(".", 1)
                cases.setdefault(case, {})[param] = value
        return cases

    def attempt(label, fn):
        try:
            fn()
        except Exception as exc:  # reported back, the test decides
            errors[label] = f"{type(exc).__name__}: {exc}"

    for key, dense in inputs.items():
        if key.startswith("dense24::"):
            case = key[len("dense24::"):]
            attempt("from_dense24::" + case, lambda: out.update(
                {"ct24::" + k: v.contiguous() for k, v in Sparse24BitMaskTensor.from_dense(dense).dict(name_prefix=case).items()}))
        if key.startswith("densebm::"):
            case = key[len("densebm::"):]
            attempt("from_densebm::" + case, lambda: out.update(
                {"ctbm::" + k: v.contiguous() for k, v in BitmaskTensor.from_dense(dense).dict(name_prefix=case).items()}))

    for case, params in group("ours24::").items():
        attempt("dec24::" + case, lambda: out.__setitem__(
            "dec24::" + case, Sparse24BitMaskTensor.from_compressed_data(**params).decompress().contiguous()))
    for case, params in group("oursbm::").items():
        attempt("decbm::" + case, lambda: out.__setitem__(
            "decbm::" + case, BitmaskTensor(**params).decompress().contiguous()))

    compressors = {
        "sparse-24-bitmask": Sparse24BitMaskCompressor(config=Sparse24BitMaskConfig()),
        "sparse-bitmask": BitmaskCompressor(config=BitmaskConfig()),
    }
    for fmt, compressor in compressors.items():
        for tag in job["sd_dtypes"]:
            dense_sd = {k[len(f"sd::{tag}::"):]: v for k, v in inputs.items() if k.startswith(f"sd::{tag}::")}
            compressed = compressor.compress(dense_sd, compression_targets=set(job["targets"]))
            for k, v in compressed.items():
                out[f"sdct::{fmt}::{tag}::{k}"] = v.contiguous()
            prefix = f"sdours::{fmt}::{tag}::"
            ours = {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)}
            for k, v in compressor.decompress_from_state_dict(ours):
                out[f"sddec::{fmt}::{tag}::{k}"] = v.contiguous()

    for fmt, folder in job["folders"].items():  # checkpoint folders written by write_sparse (checksums in metadata)
        attempt("folder::" + fmt, lambda: out.update(
            {f"folder::{fmt}::{k}": v.contiguous() for k, v in compressors[fmt].decompress(folder)}))

    configs = [SparsityCompressionConfig.load_from_registry(c["format"], **c).model_dump() for c in job["configs"]]
    save_file({k: v.contiguous().clone() for k, v in out.items()}, job["output"])
    json.dump({"errors": errors, "configs": configs}, open(job["report"], "w"))
    """
)


def _run(cmd, timeout=900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _probe(python: Path) -> subprocess.CompletedProcess:
    return _run([str(python), "-c", PROBE], timeout=300)


def _pip_install(python: Path, *args: str) -> None:
    proc = _run([str(python), "-m", "pip", "install", "--quiet", *args])
    if proc.returncode:
        text = proc.stdout + proc.stderr
        if NETWORK_ERRORS.search(text):
            pytest.skip(f"pip cannot install {' '.join(args)} from the package registry: {text.strip()[-400:]}")
        pytest.fail(f"pip install {' '.join(args)} failed:\n{text[-3000:]}")


def _venv(path: Path, system_site: bool) -> Path:
    cmd = [sys.executable, "-m", "venv", str(path)] + (["--system-site-packages"] if system_site else [])
    proc = _run(cmd, timeout=300)
    if proc.returncode:
        pytest.fail(f"python -m venv failed:\n{proc.stdout}{proc.stderr}")
    return path / "bin" / "python"


@pytest.fixture(scope="session")
def ct014_python(tmp_path_factory) -> Path:
    """Python of an environment with compressed-tensors 0.14.0.1 (created once per session)."""
    reuse = os.environ.get("UNIPRUNING_CT014_PYTHON")
    if reuse:
        proc = _probe(Path(reuse))
        assert proc.returncode == 0, f"UNIPRUNING_CT014_PYTHON={reuse} lacks compressed-tensors {CT_VERSION}:\n{proc.stderr}"
        return Path(reuse)
    start = time.perf_counter()
    root = tmp_path_factory.mktemp("ct014")
    proc = None
    if not os.environ.get("UNIPRUNING_CT014_CLEAN"):
        # 1. reuse this environment's torch / transformers 5 / numpy / safetensors; only the package
        python = _venv(root / "shared-venv", system_site=True)
        _pip_install(python, "--no-deps", f"compressed-tensors=={CT_VERSION}")
        proc = _probe(python)
    if proc is None or proc.returncode:
        # 2. a clean environment: the documented install (psutil is imported but not declared)
        python = _venv(root / "clean-venv", system_site=False)
        _pip_install(python, "torch==2.13.0", f"compressed-tensors=={CT_VERSION}", "psutil")
        proc = _probe(python)
        assert proc.returncode == 0, f"compressed-tensors {CT_VERSION} does not import:\n{proc.stderr}"
    print(f"\n[ct014 venv ready in {time.perf_counter() - start:.1f} s: {python}]", file=sys.stderr)
    return python


# ------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
SD_DTYPES = ["bf16", "fp8", "int8"]  # unquantized, FP8 and INT8 W8A8 checkpoints
TARGETS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
]


def cases_24() -> dict[str, tuple[torch.Tensor, bool]]:
    """name -> (dense, prune) for sparse-24-bitmask; all byte-comparable with compressed-tensors."""
    cases = {}
    for label, dtype in DTYPES.items():
        w = make_24(32, 64, dtype, seed=1)
        if dtype == torch.int8:
            w[w == -128] = -127  # -128 is the one deliberate deviation, tested separately
        cases[f"{label}"] = (w, False)
        few = make_24(8, 24, dtype, seed=2).clamp(-127, 127) if dtype == torch.int8 else make_24(8, 24, dtype, seed=2)
        few[0] = 0
        few[1, ::4] = 0
        few[2, 1::2] = 0
        few[3, :8] = 0
        cases[f"{label}_zero_groups"] = (few, False)
        if dtype.is_floating_point:  # -0.0 among the zeros (fp8: ranks below +0.0 in compressed-tensors)
            signed = few.clone()
            bits = signed.view(INT_VIEW[signed.element_size()])
            neg_zero = torch.tensor(-0.0).to(dtype).view(bits.dtype).item()
            bits[(bits == 0) & (torch.arange(24) % 3 != 0)] = neg_zero
            cases[f"{label}_signed_zeros"] = (signed, False)
        if dtype != torch.int8:
            gen = torch.Generator().manual_seed(3)
            dense = (torch.randint(-3, 4, (16, 64), generator=gen).float() * 0.5).to(dtype)
            cases[f"{label}_prune_ties"] = (dense, True)
    return cases


def cases_bitmask() -> dict[str, torch.Tensor]:
    cases = {}
    for label, dtype in DTYPES.items():
        cases[f"{label}"] = make_unstructured(32, 64, dtype, seed=4)
        cases[f"{label}_odd"] = make_unstructured(5, 13, dtype, seed=5)
    w = torch.tensor([[0.0, -0.0, 1.5, -2.0, float("inf"), 0.0, 3.0, -0.0, 0.25]])
    cases["fp32_signed_zero_inf"] = w
    return cases


INT8_M128 = torch.tensor([[-128, 0, 0, 5, 0, -128, 0, 0], [3, 0, -128, 0, 0, 0, 0, 0]], dtype=torch.int8)


CONFIGS = [
    sparsity_config("sparse-24-bitmask", 0.4921, "2:4", ["Linear"], ["lm_head"]),
    sparsity_config("sparse-bitmask", 0.6, "unstructured", ["Linear"], ["lm_head", "re:.*gate"]),
    sparsity_config("dense", 0.5, "2:4", ["Linear"], []),
]


@pytest.fixture(scope="session")
def ct014_results(ct014_python, tmp_path_factory):
    work = tmp_path_factory.mktemp("ct014-job")
    inputs: dict[str, torch.Tensor] = {}
    ours: dict[str, dict[str, torch.Tensor]] = {}
    for case, (dense, prune) in cases_24().items():
        inputs[f"dense24::{case}"] = dense
        ours[f"24::{case}"] = compress_sparse_24_bitmask(dense, case, prune=prune)
        for param, value in ours[f"24::{case}"].items():
            inputs[f"ours24::{case}.{param}"] = value
    for case, dense in cases_bitmask().items():
        inputs[f"densebm::{case}"] = dense
        ours[f"bm::{case}"] = compress_sparse_bitmask(dense, case)
        for param, value in ours[f"bm::{case}"].items():
            inputs[f"oursbm::{case}.{param}"] = value
    inputs["dense24::int8_minus128"] = INT8_M128
    ours["24::int8_minus128"] = compress_sparse_24_bitmask(INT8_M128, "int8_minus128")
    for param, value in ours["24::int8_minus128"].items():
        inputs[f"ours24::int8_minus128.{param}"] = value

    sd = {tag: checkpoint_state_dict(DTYPES[tag]) for tag in SD_DTYPES}
    sd_ours = {}
    for tag in SD_DTYPES:
        for key, value in sd[tag].items():
            inputs[f"sd::{tag}::{key}"] = value
        for fmt in ("sparse-24-bitmask", "sparse-bitmask"):
            sd_ours[fmt, tag] = compress_state_dict(sd[tag], TARGETS, fmt)
            for key, value in sd_ours[fmt, tag].items():
                inputs[f"sdours::{fmt}::{tag}::{key}"] = value

    folders = {}
    for fmt, structure in (("sparse-24-bitmask", "2:4"), ("sparse-bitmask", "unstructured")):
        folders[fmt] = work / f"checkpoint-{fmt}"
        folders[fmt].mkdir()
        save_file(sd["bf16"], str(folders[fmt] / "model.safetensors"), metadata={"format": "pt"})
        (folders[fmt] / "config.json").write_text("{}")
        write_sparse(folders[fmt], TARGETS, fmt, structure)

    save_file({k: v.contiguous().clone() for k, v in inputs.items()}, str(work / "inputs.safetensors"))
    (work / "ct_script.py").write_text(CT_SCRIPT)
    job = {
        "inputs": str(work / "inputs.safetensors"),
        "output": str(work / "outputs.safetensors"),
        "report": str(work / "report.json"),
        "targets": TARGETS,
        "sd_dtypes": SD_DTYPES,
        "configs": CONFIGS,
        "folders": {fmt: str(folder) for fmt, folder in folders.items()},
    }
    (work / "job.json").write_text(json.dumps(job))
    start = time.perf_counter()
    proc = _run([str(ct014_python), str(work / "ct_script.py"), str(work / "job.json")], timeout=600)
    assert proc.returncode == 0, f"compressed-tensors script failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    print(f"\n[compressed-tensors {CT_VERSION} script: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    report = json.loads((work / "report.json").read_text())
    return {
        "ct": load_file(job["output"]),
        "errors": report["errors"],
        "configs": report["configs"],
        "ours": ours,
        "sd": sd,
        "sd_ours": sd_ours,
        "folders": folders,
    }


def checkpoint_state_dict(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A bf16 Llama-like state dict whose target weights are stored in ``dtype`` (quantized for int8 / fp8).

    int8 weights avoid -128, which compressed-tensors 0.14.0.1 drops (test_ct_drops_int8_minus_128_we_do_not).
    """
    sd = llama_like_state_dict(torch.bfloat16)
    for seed, module in enumerate(TARGETS):
        weight = sd[f"{module}.weight"]
        stored = make_24(*weight.shape, dtype, seed=100 + seed)
        sd[f"{module}.weight"] = stored.clamp(-127, 127) if dtype == torch.int8 else stored
    return sd


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    assert np.array_equal(raw(got), raw(want)), f"{what}: bytes differ"


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", list(cases_24()))
def test_24_bytes_equal_ct(ct014_results, case):
    r = ct014_results
    assert f"from_dense24::{case}" not in r["errors"], r["errors"].get(f"from_dense24::{case}")
    for param, value in r["ours"][f"24::{case}"].items():
        assert_same(value, r["ct"][f"ct24::{case}.{param}"], f"{case}.{param}")


@pytest.mark.parametrize("case", list(cases_24()) + ["int8_minus128"])
def test_ct_decompresses_our_24(ct014_results, case):
    r = ct014_results
    assert f"dec24::{case}" not in r["errors"], r["errors"].get(f"dec24::{case}")
    dense, _ = cases_24().get(case, (INT8_M128, False))
    # what the format holds: the kept entries bit for bit, +0 elsewhere (pruned values, -0.0)
    kept = unpack_bitmask(r["ours"][f"24::{case}"]["bitmask"], dense.shape[1])
    bits = dense.view(INT_VIEW[dense.element_size()])
    want = torch.where(kept, bits, torch.zeros_like(bits)).view(dense.dtype)
    assert_same(r["ct"][f"dec24::{case}"], want, case)


def test_ct_drops_int8_minus_128_we_do_not(ct014_results):
    r = ct014_results
    ct_bitmask = r["ct"]["ct24::int8_minus128.bitmask"]
    ours = r["ours"]["24::int8_minus128"]
    assert not torch.equal(ct_bitmask, ours["bitmask"])
    ct_values = r["ct"]["ct24::int8_minus128.compressed"]
    assert (ct_values == -128).sum() < (INT8_M128 == -128).sum()  # compressed-tensors lost them
    assert (ours["compressed"] == -128).sum() == (INT8_M128 == -128).sum()


@pytest.mark.parametrize("case", list(cases_bitmask()))
def test_bitmask_bytes_equal_ct(ct014_results, case):
    r = ct014_results
    assert f"from_densebm::{case}" not in r["errors"], r["errors"].get(f"from_densebm::{case}")
    for param, value in r["ours"][f"bm::{case}"].items():
        assert_same(value, r["ct"][f"ctbm::{case}.{param}"], f"{case}.{param}")


@pytest.mark.parametrize("case", list(cases_bitmask()))
def test_ct_decompresses_our_bitmask(ct014_results, case):
    r = ct014_results
    assert f"decbm::{case}" not in r["errors"], r["errors"].get(f"decbm::{case}")
    want = cases_bitmask()[case].clone()
    if want.is_floating_point() and want.dtype != torch.float8_e4m3fn:
        want[want == 0] = 0.0  # -0.0 is not stored: it comes back as +0.0
    assert_same(r["ct"][f"decbm::{case}"], want, case)


@pytest.mark.parametrize("tag", SD_DTYPES)
@pytest.mark.parametrize("fmt", ["sparse-24-bitmask", "sparse-bitmask"])
def test_state_dict_matches_ct(ct014_results, fmt, tag):
    """Whole state dicts, quantized ones (int8 / fp8 weights, scales and zero points beside) included."""
    r = ct014_results
    prefix = f"sdct::{fmt}::{tag}::"
    ct_sd = {k[len(prefix):]: v for k, v in r["ct"].items() if k.startswith(prefix)}
    ours = r["sd_ours"][fmt, tag]
    assert sorted(ct_sd) == sorted(ours)
    for key in ours:
        assert_same(ours[key], ct_sd[key], key)
    prefix = f"sddec::{fmt}::{tag}::"
    back = {k[len(prefix):]: v for k, v in r["ct"].items() if k.startswith(prefix)}
    assert sorted(back) == sorted(r["sd"][tag])
    for key, value in r["sd"][tag].items():
        assert_same(back[key], value, key)


@pytest.mark.parametrize("fmt", ["sparse-24-bitmask", "sparse-bitmask"])
def test_ct_reads_our_checkpoint_files(ct014_results, fmt):
    """compressed-tensors' own folder reader takes shards with our checksum metadata."""
    r = ct014_results
    folder = r["folders"][fmt]
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert "unipruning.crc32" in handle.metadata()
    assert f"folder::{fmt}" not in r["errors"], r["errors"].get(f"folder::{fmt}")
    prefix = f"folder::{fmt}::"
    theirs = {k[len(prefix):]: v for k, v in r["ct"].items() if k.startswith(prefix)}
    ours = load_sparse_state_dict(folder)
    assert sorted(theirs) == sorted(ours)
    for key, value in ours.items():
        assert_same(theirs[key], value, key)


def test_sparsity_config_parses_in_ct(ct014_results):
    for ours, theirs in zip(CONFIGS, ct014_results["configs"]):
        assert theirs == ours
