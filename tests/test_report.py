"""The report stage on hand-made evaluation files: tables, deltas, figures, escaping, missing inputs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from tunepipe import reporting
from tunepipe.params import Params

MODELS = ("base", "sft", "final")
METRICS = {
    "base": {"task_accuracy": 0.25, "acc_arithmetic": 0.5, "acc_text": 0.0, "rougeL": 0.3, "perplexity": 20.0,
             "pref_accuracy": 0.5, "eos_rate": 0.5, "repeat_rate": 0.5, "mean_new_tokens": 30.0, "n_prompts": 4},
    "sft": {"task_accuracy": 0.5, "acc_arithmetic": 1.0, "acc_text": 0.0, "rougeL": 0.6, "perplexity": 5.0,
            "pref_accuracy": 0.75, "eos_rate": 1.0, "repeat_rate": 0.0, "mean_new_tokens": 4.0, "n_prompts": 4},
    "final": {"task_accuracy": 0.75, "acc_arithmetic": 1.0, "acc_text": 0.5, "rougeL": 0.7, "perplexity": 6.0,
              "pref_accuracy": 1.0, "eos_rate": 1.0, "repeat_rate": 0.0, "mean_new_tokens": 3.5, "n_prompts": 4},
}
NASTY = "<script>alert('x')</script> | a & b"


def gen_row(model, i, output, task, failures, family="arithmetic"):
    return {"model": model, "id": f"t{i}", "family": family, "prompt": f"<|im_start|>user\nQuestion {i}? {NASTY}"
            f"<|im_end|>\n<|im_start|>assistant\n", "reference": f"answer {i}", "output": output,
            "n_new_tokens": 3, "stopped_at_eos": "no_stop" not in failures, "truncated": False, "task": task,
            "failures": failures, "rougeL": 0.5, "ref_nll": 1.0}


GENERATIONS = [
    gen_row("base", 0, "rambling " * 20 + NASTY, "wrong_answer", ["wrong_answer", "too_long", "no_stop"]),
    gen_row("base", 1, "answer 1", "pass", []),
    gen_row("base", 2, "loop loop loop loop", "constraint_broken", ["constraint_broken", "repetitive"], "text"),
    gen_row("sft", 0, "answer 0", "pass", []),
    gen_row("sft", 1, "answer 1", "pass", []),
    gen_row("sft", 2, "Answer 2", "constraint_broken", ["constraint_broken"], "text"),
    gen_row("final", 0, "answer 0", "pass", []),
    gen_row("final", 1, "answer 7", "wrong_answer", ["wrong_answer"]),
    gen_row("final", 2, "answer 2", "pass", [], "text"),
]
PREFERENCES = [{"model": m, "id": f"p{i}", "family": "text", "rejected_kind": kind, "chosen_logp": -1.0,
                "rejected_logp": -2.0, "margin": 1.0, "correct": ok}
               for m in MODELS for i, (kind, ok) in enumerate([("rambling", True), ("no_stop", m != "base")])]


def write_tsv(path: Path, name: str, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step\t" + name + "\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("metrics").mkdir()
    Path("metrics/eval.json").write_text(json.dumps(METRICS))
    Path("data/eval").mkdir(parents=True)
    Path("data/eval/generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENERATIONS))
    Path("data/eval/preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PREFERENCES))
    sft = Path("metrics/train_sft/plots/metrics")
    write_tsv(sft / "loss.tsv", "loss", [2.0, 1.5, 1.2, 1.0])
    write_tsv(sft / "eval/loss.tsv", "loss", [1.8, 1.3])
    dpo = Path("metrics/train_dpo/plots/metrics")
    write_tsv(dpo / "loss.tsv", "loss", [0.69, 0.6, 0.5])
    write_tsv(dpo / "rewards/margins.tsv", "margins", [0.0, 0.3, 0.8])
    write_tsv(dpo / "eval/rewards/accuracies.tsv", "accuracies", [0.5, "nan", 0.9])
    Path("metrics/train_sft.json").write_text(json.dumps({"train_loss": 1.0, "eval": {"loss": 1.3}}))
    Path("data/raw").mkdir(parents=True)
    Path("data/raw/manifest.json").write_text(json.dumps({"files": {"sft_test.jsonl": {"rows": 3, "sha256": "ab" * 32}},
                                                         "model": {"sha256": "cd" * 32}}))
    return tmp_path


def run_report(params=None):
    from stages import report

    report.main(params or Params.model_validate({"report": {"title": "Test <run> & report", "n_samples": 2}}))


def test_report_writes_markdown_html_and_figures(project):
    run_report()
    out = Path("reports")
    assert sorted(p.name for p in (out / "figures").iterdir()) == \
        ["dpo_loss.png", "dpo_rewards.png", "sft_loss.png", "skill_accuracy.png"]
    for png in (out / "figures").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert md.startswith("# Test &lt;run&gt; &amp; report")  # GitHub would drop a raw <run> as a tag
    assert "![SFT loss](figures/sft_loss.png)" in md
    assert "ab" * 32 in md and "cd" * 32 in md  # hashes from the manifest
    assert "n_samples: 2" in md  # the params
    assert not list(Path(".").glob(".tmp-reports-*"))


def test_metrics_table_has_values_and_deltas(project):
    run_report()
    md = Path("reports/report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| task_accuracy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["task_accuracy ↑", "0.2500", "0.5000", "0.7500", "+0.2500", "+0.5000"]
    ppl = next(line for line in md.splitlines() if line.startswith("| perplexity"))
    assert "↓" in ppl and "-15.0000" in ppl and "-14.0000" in ppl
    html = Path("reports/report.html").read_text()
    # a drop in perplexity is an improvement (green), a rise in it would be red
    assert re.search(r'class="num better">-15\.0000<', html)
    assert re.search(r'class="num better">\+0\.5000<', html)


def test_html_is_standalone_and_escaped(project):
    run_report()
    html = Path("reports/report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "Test &lt;run&gt; &amp; report" in html
    assert "&lt;|im_start|&gt;" in html
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) == 4
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert not re.search(r"(src|href)=['\"](?!data:)", html)  # nothing loaded from disk or network


def test_markdown_table_cells_are_escaped(project):
    run_report()
    md = Path("reports/report.md").read_text()
    assert "<script>" not in md
    for line in md.splitlines():
        if line.startswith("| ") and "Question" in line:
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            assert len(cells) in (3, 2 + len(MODELS))  # a '|' in the text did not add a column


def test_samples_side_by_side_and_error_analysis(project):
    run_report()
    md = Path("reports/report.md").read_text()
    samples = md.split("## Sample generations")[1].split("## Error analysis")[0]
    # 2 samples, round-robin over families: t0 (arithmetic) then t2 (text)
    assert "answer 0" in samples and "Answer 2" in samples and "Question 1?" not in samples
    errors = md.split("## Error analysis")[1].split("## Provenance")[0]
    counts = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
              for line in errors.splitlines() if line.startswith("| ") and not line.startswith("| failure")
              and "Question" not in line and not line.startswith("| rejected") and "/" not in line}
    assert counts["wrong answer"] == ["1", "0", "1"]
    assert counts["constraint broken"] == ["1", "1", "0"]
    assert counts["no stop"] == ["1", "0", "0"]
    # one example each, taken from the final model where it has one
    assert "**wrong answer** (final, t1)" in errors
    assert "**repetitive** (base, t2)" in errors
    assert "| no_stop | 0/1 (0%) | 1/1 (100%) | 1/1 (100%) |" in errors


def test_missing_training_curves_are_reported_not_fatal(project):
    import shutil

    shutil.rmtree("metrics/train_dpo")
    run_report()
    md = Path("reports/report.md").read_text()
    assert "metrics/train_dpo/plots/metrics" in md
    assert sorted(p.name for p in Path("reports/figures").iterdir()) == ["sft_loss.png", "skill_accuracy.png"]


def test_missing_eval_metrics_is_a_clear_error(project):
    from tunepipe.cli import StageError

    Path("metrics/eval.json").unlink()
    with pytest.raises(StageError, match="metrics/eval.json is missing"):
        run_report()


def test_subset_of_models(project):
    Path("metrics/eval.json").write_text(json.dumps({"final": METRICS["final"], "base": METRICS["base"]}))
    run_report()
    md = Path("reports/report.md").read_text()
    assert "Models: base, final." in md
    assert "Δ final vs base" in md and "Δ sft" not in md


def test_read_curves_skips_non_numeric_points(tmp_path):
    write_tsv(tmp_path / "metrics/eval/rewards/accuracies.tsv", "accuracies", [0.5, "nan", 0.9])
    curves = reporting.read_curves(tmp_path)
    assert list(curves) == ["eval/rewards/accuracies"]
    assert curves["eval/rewards/accuracies"] == [(0.0, 0.5), (2.0, 0.9)]


def test_report_stage_help_is_fast_and_documented():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "stages.report", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert out.returncode == 0 and "reports/" in out.stdout


def test_prompt_tail_starts_at_a_line_and_blank_answers_are_named():
    prompt = "system: " + "x" * 300 + "\nuser: What is 2+2?\nassistant:"
    assert reporting.prompt_tail(prompt, limit=60) == "…\nuser: What is 2+2?\nassistant:"
    assert reporting.prompt_tail("short prompt") == "short prompt"
    assert reporting.shown("") == "(empty)" and reporting.shown("\n\n") == "(whitespace only)"
    assert reporting.shown(" 42") == " 42"
