"""Greedy generation with ``vllm.LLM`` for a list of checkpoints; runs INSIDE the vLLM environment.

Usage: ``python tests/vllm_generate.py SPEC.json OUT.json`` (tests/test_serving_generate.py runs it).
SPEC: ``{"prompts": [...], "max_tokens": N, "runs": [{"label", "model", "dtype",
"tensor_parallel_size", "env"}, ...]}`` (``env``: variables set for that run only). OUT: per
label ``{"tokens", "text", "seconds"}`` or ``{"error"}``, written after every run, so a crash
still reports the runs before it.

The runs share this process: with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` each engine starts in
a few seconds instead of spawning and importing a new engine process per checkpoint. The
``__main__`` guard is required: vLLM's CPU build starts its workers with ``spawn``. Before each
run a line ``MARK + label`` goes to stdout, where vLLM logs, so the caller can attribute log
lines (the plugin's per-layer choices) to runs.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

MARK = "[vllm_generate] run "


def generate(run: dict, prompts: list[str], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=run["model"],
        dtype=run.get("dtype", "float32"),
        tensor_parallel_size=run.get("tensor_parallel_size", 1),
        enforce_eager=True,
        max_model_len=512,
        seed=0,
    )
    try:
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "text": [o.outputs[0].text for o in outputs],
        "seconds": time.perf_counter() - start,
    }


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    report: dict[str, dict] = {}
    for run in spec["runs"]:
        print(f"{MARK}{run['label']}", flush=True)  # vLLM logs to stdout: its lines after this are the run's
        saved = dict(os.environ)
        os.environ.update(run.get("env", {}))
        try:
            report[run["label"]] = generate(run, spec["prompts"], spec["max_tokens"])
        except Exception as exc:  # reported back; the pytest side decides
            report[run["label"]] = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"}
        finally:
            os.environ.clear()
            os.environ.update(saved)
        Path(out_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
