#!/usr/bin/env python
"""Write a Llama-shaped model with random weights (and the demo tokenizer) for cost benchmarks.

    python benchmarks/make_llama.py OUT --hidden 4096 --intermediate 11008 --layers 2 --heads 32

Quality numbers on such a model mean nothing; time and memory of pruning it do, since they
depend only on the shapes. Weights are bf16, seeded.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from unipruning_modifier.data import demo_model_path


def build(out, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None, seed: int = 0) -> int:
    """Save a random bf16 Llama of these shapes (demo tokenizer) to ``out``; its parameter count."""
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    count = build(args.out, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.seed)
    print(f"{count / 1e6:.1f}M parameters -> {args.out}")


if __name__ == "__main__":
    main()
