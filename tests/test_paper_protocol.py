"""Smoke test of the paper benchmark's runner: 1 round, 2 clients, a tiny BERT classifier, 2 methods, resume, report.
It keeps the script working; no benchmark figure is asserted."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from .conftest import VOCAB, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paper_protocol  # noqa: E402


@pytest.fixture
def model_dir(tmp_path):
    """A tiny BERT classifier (10 labels) and its tokenizer, saved as a model directory."""
    path = tmp_path / "tiny_bert"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=64, num_labels=10, pad_token_id=0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_grid_runs_resumes_and_reports(tmp_path, model_dir, capsys):
    results = tmp_path / "results.jsonl"
    argv = ["--model", str(model_dir), "--num-rounds", "1", "--num-clients", "2", "--num-experts", "4",
            "--max-train-samples-per-client", "4", "--max-global-eval-samples", "8", "--max-local-eval-samples", "4",
            "--methods", "fedavg,fcmoe", "--alphas", "1.0", "--seeds", "0", "--results", str(results)]
    paper_protocol.main(argv)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["method"] for r in records] == ["fedavg", "fcmoe"]
    final = records[1]["rounds"][-1]
    assert {"global_accuracy", "global_f1", "local_accuracy_mean", "conflict_share"} <= set(final)
    assert len(final["local_accuracy_per_client"]) == 2
    paper_protocol.main(argv)  # every cell done: nothing runs again
    assert len(results.read_text().splitlines()) == 2 and "skip" in capsys.readouterr().out
    paper_protocol.main(["--report", "--results", str(results), "--report-dir", str(tmp_path / "report")])
    report = (tmp_path / "report" / "paper_protocol.md").read_text()
    assert "| fcmoe |" in report and (tmp_path / "report" / "paper_protocol_alpha1.png").exists()


def test_rounds_to_converge_is_the_first_round_within_a_point_of_the_best():
    from paper_report import rounds_to_converge

    assert rounds_to_converge([0.1, 0.5, 0.595, 0.6, 0.58]) == 3
    assert rounds_to_converge([0.7]) == 1


def test_attack_cell_rejects_the_attacker_with_defences_on_and_is_reported(tmp_path, model_dir):
    results = tmp_path / "results.jsonl"
    common = ["--model", str(model_dir), "--num-rounds", "1", "--num-clients", "4", "--num-experts", "4",
              "--max-train-samples-per-client", "4", "--max-global-eval-samples", "8", "--max-local-eval-samples", "4",
              "--methods", "fedavg", "--alphas", "1.0", "--seeds", "0", "--results", str(results)]
    paper_protocol.main(common)
    paper_protocol.main(common + ["--attack", "sign_flip_x100"])
    paper_protocol.main(common + ["--attack", "sign_flip_x100", "--defences", "off"])
    clean, on, off = [json.loads(line) for line in results.read_text().splitlines()]
    assert clean["kind"] == "cell" and on["kind"] == off["kind"] == "attack_cell"
    assert len({clean["key"], on["key"], off["key"]}) == 3
    assert "client_3" in json.dumps(on["rounds"][0]["rejected"])
    assert "client_3" not in json.dumps(off["rounds"][0]["rejected"])
    paper_protocol.main(["--report", "--results", str(results), "--report-dir", str(tmp_path / "report")])
    report = (tmp_path / "report" / "paper_protocol.md").read_text()
    assert "| fedavg | 1 | 0 | sign_flip_x100 | on |" in report and "| 1 / 0 of 1 |" in report


def test_rounds_to_reach_is_the_first_round_at_the_target():
    from paper_report import rounds_to_reach

    assert rounds_to_reach([0.1, 0.3, 0.5, 0.4], 0.5) == 3
    assert rounds_to_reach([0.1, 0.3], 0.5) is None
