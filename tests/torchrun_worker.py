"""One prune of the demo model per case, under torchrun (data-parallel) or in one process.

    torchrun --nproc_per_node 2 tests/torchrun_worker.py OUT   # each rank: OUT/<case>-rank<r>.pt
    python tests/torchrun_worker.py OUT                          # OUT/<case>-single.pt

Each rank loads the model with compressed-tensors' ``load_offloaded_model`` (weights shared
between ranks in CPU memory), calibrates on its own slice of the 16 windows
(``distributed.rank_slice``), saves the checkpoint from every rank and loads it back at once.
The file records the token windows this process calibrated on, every target weight, the targets
written in each round of ``distributed.write_weights``, the sparse
format the folder holds when save_sparse returns, and whether the checkpoint loaded then equals
the model in memory; under torchrun, OUT/refused-rank<r>.txt holds
the error given when every rank passes the same (whole) dataset. ``python tests/torchrun_worker.py
OUT '{"case": {fields}}'`` runs other cases. tests/test_torchrun.py compares the files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

NUM_SAMPLES, SEQ_LEN = 16, 128
IGNORE = ["re:.*lm_head"]
CASES = {
    "layer-0.5": {"sparsity": 0.5},
    "2:4-least_squares": {
        "mask_structure": "2:4", "nm_order": "first_step", "reconstruct": "least_squares",
        "dense_target": 0.3, "dense_target_every": 2,
    },
    "2:4-tuned": {
        "mask_structure": "2:4", "nm_order": "first_step", "reconstruct": "least_squares",
        "dense_target": 0.3, "dense_target_every": 2, "block_tune_epochs": 2,
    },
}


def main(out: Path, cases: dict[str, dict]) -> None:
    torch.set_num_threads(1)  # reduction orders independent of the core count
    from compressed_tensors.offload import load_offloaded_model
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipruning_modifier import UniPruningModifier, data, distributed
    from unipruning_modifier.checkpoint import load_sparse, save_sparse, sparse_config_of

    launched = "RANK" in os.environ
    if launched:
        distributed.init()
    rank, size = distributed.world()
    tag = f"rank{rank}" if size > 1 else "single"
    path = data.demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = data.calibration_windows(data.token_stream(tokenizer, data.read_text(data.demo_calibration_text())), NUM_SAMPLES, SEQ_LEN)
    mine = windows[list(distributed.rank_slice(len(windows)))]

    rounds = []  # the targets of each distributed.write_weights call: one per rank per round
    write_weights = distributed.write_weights

    def recording(modules, compute):
        rounds.append(list(modules))
        return write_weights(modules, compute)

    distributed.write_weights = recording

    def prune(fields: dict, calibration: torch.Tensor):
        rounds.clear()
        with load_offloaded_model():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="auto_offload")
        seen = []
        model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().cpu().clone()))
        oneshot(
            model=model, dataset=data.windows_dataset(calibration), recipe=UniPruningModifier(ignore=IGNORE, **fields),
            processor=tokenizer, num_calibration_samples=len(calibration), max_seq_length=SEQ_LEN, pipeline="sequential",
            shuffle_calibration_samples=False,
        )
        return model, seen

    for case, fields in cases.items():
        model, seen = prune(fields, mine)
        weights = {
            name: module.weight.detach().cpu().clone()
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name
        }
        target = next(m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
        cache = type(target._parameters).__name__  # the offload holding the weights
        folder = out / f"{case.replace(':', '_')}-checkpoint"
        save_sparse(model, folder)  # every rank; none returns before rank 0 has rewritten the folder
        stored = (sparse_config_of(folder) or {}).get("format")
        loaded = load_sparse(folder, dtype=torch.float32).state_dict()
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        equal = all(torch.equal(loaded[name], state[name].to(loaded[name].dtype)) for name in loaded)
        torch.save(
            {
                "seen": torch.cat(seen) if seen else None, "windows": mine, "weights": weights, "loaded_equal": equal,
                "world": size, "cache": cache, "format": stored, "rounds": list(rounds),
            },
            out / f"{case}-{tag}.pt",
        )
        if size > 1:
            torch.distributed.barrier()
    if size > 1:
        try:
            prune({"sparsity": 0.5}, windows)
            refused = ""
        except ValueError as error:
            refused = str(error)
        (out / f"refused-rank{rank}.txt").write_text(refused)
    if launched:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else CASES)
