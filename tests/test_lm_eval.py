"""`unipruning eval`: lm-eval-harness on our checkpoints, with local tasks (offline)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from unipruning_modifier import UniPruningModifier
from unipruning_modifier.checkpoint import sparse_config_of
from unipruning_modifier.cli import main
from unipruning_modifier.evaluation.harness import cloze_items

from .conftest import load, run_oneshot

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sparse_checkpoint(tiny_model_path, calibration, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "sparse"
    model = run_oneshot(load(tiny_model_path), UniPruningModifier(mask_structure="2:4", ignore=["re:.*lm_head"]), calibration, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert sparse_config_of(out)["format"] == "sparse-24-bitmask"
    return out


def run_eval(capsys, *argv):
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_sparse_checkpoint_with_local_tasks(capsys, sparse_checkpoint, tmp_path, tiny_model_path):
    text = tmp_path / "notes.txt"
    text.write_text("The pruned model reads this text.\n\nA second document follows here, with more words.\n")
    tasks = f"unipruning_demo_ppl,unipruning_demo_mc,text:{text}"
    code, out, err = run_eval(capsys, "--model", str(sparse_checkpoint), "--tasks", tasks, "--limit", "8", "--batch-size", "4")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert set(result["tasks"]) == {"unipruning_demo_ppl", "unipruning_demo_mc", "text_notes"}
    for task in ("unipruning_demo_ppl", "text_notes"):
        metrics = result["tasks"][task]
        assert metrics["word_perplexity"] > 1 and metrics["byte_perplexity"] > 1
        assert math.isclose(metrics["bits_per_byte"], math.log2(metrics["byte_perplexity"]), rel_tol=1e-6)
    mc = result["tasks"]["unipruning_demo_mc"]
    assert 0.0 <= mc["acc"] <= 1.0 and mc["sample_len"] == 8

    # the sparse checkpoint is evaluated as the pruned model: same numbers as the dense save of it
    dense = tmp_path / "dense"
    from unipruning_modifier.checkpoint import load_sparse

    load_sparse(sparse_checkpoint).save_pretrained(dense)
    (dense / "tokenizer.json").write_bytes((sparse_checkpoint / "tokenizer.json").read_bytes())
    (dense / "tokenizer_config.json").write_bytes((sparse_checkpoint / "tokenizer_config.json").read_bytes())
    code, out, err = run_eval(capsys, "--model", str(dense), "--tasks", "unipruning_demo_ppl", "--limit", "8")
    assert code == 0, err
    again = json.loads(out.strip().splitlines()[-1])["tasks"]["unipruning_demo_ppl"]
    assert again["word_perplexity"] == pytest.approx(result["tasks"]["unipruning_demo_ppl"]["word_perplexity"], rel=1e-5)


@pytest.mark.parametrize(
    "tasks, message",
    [
        ("no_such_task_anywhere", "unknown lm-eval task(s) ['no_such_task_anywhere']"),
        ("text:/nonexistent/file.txt", "no such text file"),
        (",", "at least one task"),
    ],
)
def test_eval_bad_tasks_fail_before_loading(capsys, sparse_checkpoint, tasks, message):
    code, _, err = run_eval(capsys, "--model", str(sparse_checkpoint), "--tasks", tasks)
    assert code == 2 and "--tasks" in err and message in err, err


def test_cloze_items_are_seeded_and_well_formed():
    text = " ".join(f"Sentence number {i} talks about the quiet garden behind the house." for i in range(30))
    items = cloze_items(text, count=10)
    assert items == cloze_items(text, count=10)
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert item["choices"][item["label"]].strip() == "house"
