"""Zero-shot evaluation with lm-eval-harness on pruned or compressed checkpoints (``unipruning eval``).

The model is loaded here (``checkpoint.load_sparse``, so our sparse formats work) and handed
to lm-eval's HF model class (``HFLM(pretrained=model)``); standard task names (wikitext,
arc_easy, hellaswag, piqa, winogrande, boolq, rte, openbookqa, ...) pass through to lm-eval.
Two kinds of local task need no download:

- ``text:PATH``: perplexity (word / byte perplexity, bits per byte, lm-eval's rolling
  loglikelihood) of a text file, split into documents at blank lines;
- ``unipruning_demo_ppl`` and ``unipruning_demo_mc``: the demo evaluation text as a perplexity
  task, and a small multiple-choice cloze task built from it (pick the word that ends a sentence
  among four words of the text; seeded, so always the same items).
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

from .. import data

DEMO_PPL = "unipruning_demo_ppl"
DEMO_MC = "unipruning_demo_mc"
TEXT_PREFIX = "text:"


def _write_jsonl(rows: list[dict], folder: Path, name: str) -> str:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _json_task(name: str, rows: list[dict], folder: Path, **fields) -> dict:
    """lm-eval task config over ``rows`` written as a local JSON-lines test split."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": _write_jsonl(rows, folder, name)}},
        "test_split": "test",
        **fields,
        "metadata": {"version": 1.0},
    }


def perplexity_task(name: str, text: str, folder: Path) -> dict:
    """lm-eval task config: rolling loglikelihood over the text's blank-line-separated documents."""
    documents = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not documents:
        raise ValueError(f"task {name}: the text is empty")
    return _json_task(
        name,
        [{"text": d} for d in documents],
        folder,
        output_type="loglikelihood_rolling",
        doc_to_text="",
        doc_to_target="{{text}}",
        metric_list=[
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
    )


def cloze_items(text: str, count: int = 64, seed: int = 0) -> list[dict]:
    """Multiple-choice items: a sentence without its last word, that word and 3 other words."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 8]
    vocabulary = sorted({w for w in re.findall(r"\b[a-z]{4,}\b", text)})
    rng = random.Random(seed)
    items = []
    for sentence in rng.sample(sentences, min(count, len(sentences))):
        words = sentence.rstrip(".!?").split()
        answer = words[-1]
        if not re.fullmatch(r"[A-Za-z]{3,}", answer):
            continue
        distractors = rng.sample([w for w in vocabulary if w != answer.lower()], 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append({"context": " ".join(words[:-1]), "choices": [" " + c for c in choices], "label": choices.index(answer)})
    return items


def multiple_choice_task(name: str, items: list[dict], folder: Path) -> dict:
    """lm-eval task config: pick ``choices[label]`` after ``context`` (accuracy, length-normalised too)."""
    return _json_task(
        name,
        items,
        folder,
        output_type="multiple_choice",
        doc_to_text="{{context}}",
        doc_to_choice="choices",
        doc_to_target="label",
        target_delimiter="",
        metric_list=[
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    )


@functools.cache
def task_manager():
    """lm-eval's task index, built once per process (indexing every task takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_specs(names: list[str], folder: Path) -> list[str | dict]:
    """lm-eval task specs for ``names``: local tasks become config dicts, others stay names.

    The local tasks' data files are written to ``folder``, which must outlive the evaluation.
    Raises ValueError naming the task when a local text is missing or the name is unknown to lm-eval.
    """
    specs: list[str | dict] = []
    unknown = []
    known = None
    for name in names:
        if name == DEMO_PPL:
            specs.append(perplexity_task(name, data.read_text(data.demo_eval_text()), folder))
        elif name == DEMO_MC:
            specs.append(multiple_choice_task(name, cloze_items(data.read_text(data.demo_eval_text())), folder))
        elif name.startswith(TEXT_PREFIX):
            path = Path(name[len(TEXT_PREFIX):]).expanduser()
            if not path.is_file():
                raise ValueError(f"task {name!r}: no such text file {path}")
            try:
                text = data.read_text(str(path))
            except ValueError as error:
                raise ValueError(f"task {name!r}: {error}") from None
            specs.append(perplexity_task(f"text_{re.sub(r'[^A-Za-z0-9]+', '_', path.stem)}", text, folder))
        else:
            if known is None:
                known = set(task_manager().all_tasks)
            if name not in known:
                unknown.append(name)
            specs.append(name)
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; use lm-eval task names (e.g. arc_easy), "
            f"'{TEXT_PREFIX}PATH', {DEMO_PPL} or {DEMO_MC}"
        )
    return specs


def _clean(metrics: dict) -> dict:
    """lm-eval's "acc,none" keys as "acc"; the alias entry dropped."""
    out = {}
    for key, value in metrics.items():
        if key == "alias" or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric} ({filt})"] = value
    return out


def evaluate(model, tokenizer, specs: list[str | dict], batch_size: int = 8, limit: int | None = None,
             num_fewshot: int | None = None) -> dict[str, dict]:
    """Run lm-eval on an already-loaded model for ``task_specs``' specs; {task: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm, tasks=specs, limit=limit, num_fewshot=num_fewshot, log_samples=False, task_manager=task_manager()
    )
    return {task: _clean(metrics) for task, metrics in results["results"].items()}
