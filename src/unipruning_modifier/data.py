"""Calibration and evaluation text: files or Hugging Face datasets to token windows.

The same helpers serve the CLI and the benchmarks, so every method sees the same samples.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_DIR = resources.files("unipruning_modifier") / "demo"


def demo_model_path() -> str:
    """The vendored 5M-parameter Llama (see demo/ORIGIN.md)."""
    return str(DEMO_DIR / "model")


def demo_calibration_text() -> str:
    return str(DEMO_DIR / "calib.txt")


def demo_eval_text() -> str:
    return str(DEMO_DIR / "eval.txt")


def read_text(source: str, split: str = "train", text_column: str = "text") -> str:
    """Text of a local file, or of a Hugging Face dataset ``name`` / ``name:config``.

    Raises FileNotFoundError or ValueError naming ``source`` when it is missing, empty, or not
    UTF-8 text (calibrating on replacement characters would prune for garbage).
    """
    path = Path(source)
    if path.is_file():
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"dataset {source!r} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                "give a plain-text file"
            ) from None
        if "\x00" in text:
            raise ValueError(f"dataset {source!r} holds NUL characters: a binary file, not text")
    elif path.exists() or source.startswith((".", "/", "~")) or source.endswith((".txt", ".text")):
        raise FileNotFoundError(f"dataset {source!r}: no such text file")
    else:
        import datasets

        name, _, config = source.partition(":")
        data = datasets.load_dataset(name, config or None, split=split)
        if text_column not in data.column_names:
            raise ValueError(f"dataset {source!r} has no column {text_column!r} (columns: {data.column_names})")
        text = "\n\n".join(t for t in data[text_column] if t)
    if not text.strip():
        raise ValueError(f"dataset {source!r} is empty")
    return text


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens added)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` non-overlapping windows of ``seq_len`` tokens chosen at random (seeded).

    Fewer windows are returned when the text is too short for ``num_samples``.
    """
    import torch

    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    available = tokens.numel() // seq_len
    if available == 0:
        raise ValueError(f"calibration text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    windows = tokens[: available * seq_len].reshape(available, seq_len)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:num_samples]
    return windows[order.sort().values]


def windows_dataset(windows: torch.Tensor):
    """A ``datasets.Dataset`` of token windows [count, seq_len], for ``oneshot``."""
    import datasets
    import torch

    return datasets.Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})


def calibration_dataset(tokenizer, text: str, num_samples: int, seq_len: int, seed: int = 0):
    """Windows of ``text`` (see ``read_text``) chosen by ``calibration_windows``, for ``oneshot``."""
    return windows_dataset(calibration_windows(token_stream(tokenizer, text), num_samples, seq_len, seed))
