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


def with_ci(**values) -> dict:
    """A model's metrics/eval.json entry: each value with an interval 0.1 either side."""
    out = {}
    for k, v in values.items():
        out.update({k: v, f"{k}_ci_low": round(v - 0.1, 4), f"{k}_ci_high": round(v + 0.1, 4)})
    return out


def delta(metric, d, p, significant) -> dict:
    return {f"{metric}_delta": d, f"{metric}_delta_ci_low": d - 0.05, f"{metric}_delta_ci_high": d + 0.05,
            f"{metric}_p_value": p, f"{metric}_significant": significant}


METRICS = {
    "models": list(MODELS),
    "base": {**with_ci(task_accuracy=0.25, acc_arithmetic=0.5, acc_text=0.0, rougeL=0.3, perplexity=20.0,
                       pref_accuracy=0.5, pref_accuracy_norm=0.25, pref_acc_rambling=1.0, pref_acc_norm_rambling=0.0,
                       eos_rate=0.5, repeat_rate=0.5, mean_new_tokens=30.0), "n_prompts": 4, "n_pairs": 4},
    "sft": {**with_ci(task_accuracy=0.5, acc_arithmetic=1.0, acc_text=0.0, rougeL=0.6, perplexity=5.0,
                      pref_accuracy=0.75, pref_accuracy_norm=0.5, pref_acc_rambling=1.0, pref_acc_norm_rambling=0.5,
                      eos_rate=1.0, repeat_rate=0.0, mean_new_tokens=4.0), "n_prompts": 4, "n_pairs": 4},
    "final": {**with_ci(task_accuracy=0.75, acc_arithmetic=1.0, acc_text=0.5, rougeL=0.7, perplexity=6.0,
                        pref_accuracy=1.0, pref_accuracy_norm=0.625, pref_acc_rambling=1.0, pref_acc_norm_rambling=0.5,
                        eos_rate=1.0, repeat_rate=0.0, mean_new_tokens=3.5), "n_prompts": 4, "n_pairs": 4},
    "baseline_constant": with_ci(task_accuracy=0.2, acc_arithmetic=0.25),
    "baseline_random": with_ci(task_accuracy=0.15),
    "comparisons": {
        "sft_vs_base": {**delta("task_accuracy", 0.25, 0.0312, True), **delta("perplexity", -15.0, 0.002, True)},
        "final_vs_sft": {**delta("task_accuracy", 0.25, 0.5, False), **delta("perplexity", 1.0, 0.0004, True)},
        "final_vs_base": {**delta("task_accuracy", 0.5, 0.0002, True), **delta("perplexity", -14.0, 0.002, True),
                          **delta("repeat_rate", -0.5, 0.01, True)},
    },
    "headline": {"model": "final", "baseline": "constant", "delta": 0.55, "text":
                 "final: 55.0 points above the best trivial baseline (constant, 20.0%; 95% CI +30.0 to +80.0 "
                 "points, p<0.001)"},
    "settings": {"confidence": 0.95, "alpha": 0.05, "bootstrap_resamples": 1000},
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


def write_tsv(path: Path, name: str, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step\t" + name + "\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("metrics").mkdir()
    Path("metrics/eval.json").write_text(json.dumps(METRICS))
    for m in MODELS:
        Path(f"data/eval/{m}").mkdir(parents=True)
        Path(f"data/eval/{m}/generations.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in GENERATIONS if r["model"] == m))
    sft = Path("metrics/train_sft/plots/metrics")
    write_tsv(sft / "loss.tsv", "loss", [2.0, 1.5, 1.2, 1.0])
    write_tsv(sft / "eval/loss.tsv", "loss", [1.8, 1.3])
    dpo = Path("metrics/train_dpo/plots/metrics")
    write_tsv(dpo / "loss.tsv", "loss", [0.69, 0.6, 0.5])
    write_tsv(dpo / "rewards/margins.tsv", "margins", [0.0, 0.3, 0.8])
    write_tsv(dpo / "eval/rewards/accuracies.tsv", "accuracies", [0.5, "nan", 0.9])
    Path("metrics/train_sft.json").write_text(json.dumps({"train_loss": 1.0, "eval": {"loss": 1.3}}))
    Path("metrics/train_dpo.json").write_text(json.dumps({"train_loss": 0.5, "eval_rewards_accuracies": 0.8125}))
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


def md_row(md: str, start: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_headline_comes_first(project):
    run_report()
    md = Path("reports/report.md").read_text()
    # markdown escapes "<" (GitHub renders &lt; as "<")
    assert md.splitlines()[2] == ("**final: 55.0 points above the best trivial baseline (constant, 20.0%; "
                                  "95% CI +30.0 to +80.0 points, p&lt;0.001)**")
    html = Path("reports/report.html").read_text()
    assert html.index("55.0 points above the best trivial baseline") < html.index("<h2>Metrics")


def test_metrics_table_has_intervals_baselines_and_tested_deltas(project):
    run_report()
    md = Path("reports/report.md").read_text()
    assert md_row(md, "| metric") == ["metric", "base", "sft", "final", "baseline: constant", "baseline: random",
                                      "Δ sft vs base", "Δ final vs sft", "Δ final vs base"]
    assert md_row(md, "| task_accuracy") == [
        "task_accuracy ↑", "25.0% [15.0, 35.0]", "50.0% [40.0, 60.0]", "75.0% [65.0, 85.0]", "20.0% [10.0, 30.0]",
        "15.0% [5.0, 25.0]", "+25.0 pts (p=0.03) *", "+25.0 pts (p=0.50, n.s.)", "+50.0 pts (p&lt;0.001) *"]
    ppl = md_row(md, "| perplexity")
    assert ppl[0] == "perplexity ↓" and ppl[1] == "20.00 [19.90, 20.10]" and ppl[4:6] == ["–", "–"]
    assert ppl[6:] == ["-15.00 (p=0.002) *", "+1.000 (p&lt;0.001) *", "-14.00 (p=0.002) *"]
    assert md_row(md, "| rougeL")[1:4] == ["0.300 [0.200, 0.400]", "0.600 [0.500, 0.700]", "0.700 [0.600, 0.800]"]
    assert md_row(md, "| acc_arithmetic")[4] == "25.0% [15.0, 35.0]"  # the baseline per family too
    assert "α = 0.05" in md and "exact McNemar" in md
    assert not any(line.startswith("| pref_acc_rambling") for line in md.splitlines())  # its own section


def test_html_colours_only_significant_differences(project):
    run_report()
    html = Path("reports/report.html").read_text()
    # a significant drop in perplexity is an improvement (green), a significant rise is red
    assert re.search(r'class="num better" title="95% CI -15\.05 to -14\.95">-15\.00 \(p=0\.002\) \*<', html)
    assert re.search(r'class="num worse"[^>]*>\+1\.000 \(p&lt;0\.001\) \*<', html)
    assert re.search(r'class="num ns"[^>]*>\+25\.0 pts \(p=0\.50, n\.s\.\)<', html)
    assert re.search(r'class="num better"[^>]*>-50\.0 pts \(p=0\.01\) \*<', html)  # repeat rate down


def test_preference_section_leads_with_per_token_accuracy(project):
    run_report()
    md = Path("reports/report.md").read_text()
    section = md.split("## Preference accuracy (test pairs)")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0] == "| measure | base | sft | final |" and rows[1].startswith("| per token (length-normalised)")
    assert md_row(section, "| per token") == ["per token (length-normalised) ↑", "25.0% [15.0, 35.0]",
                                              "50.0% [40.0, 60.0]", "62.5% [52.5, 72.5]"]
    assert md_row(section, "| summed log-prob")[3] == "100.0% [90.0, 110.0]"
    assert md_row(section, "| DPO reward accuracy") == ["DPO reward accuracy (train-dpo, validation pairs)",
                                                        "–", "–", "81.2%"]
    assert md_row(section, "| rambling") == ["rambling", "0.0% [-10.0, 10.0]", "100.0% [90.0, 110.0]",
                                             "50.0% [40.0, 60.0]", "100.0% [90.0, 110.0]",
                                             "50.0% [40.0, 60.0]", "100.0% [90.0, 110.0]"]
    html = Path("reports/report.html").read_text()
    assert "<h2>Preference accuracy (test pairs)</h2>" in html and "81.2%" in html


FORGETTING = {  # the layout stages/forgetting.py writes
    "models": ["base", "final"],
    "base": {"arc_easy_acc": 0.6, "arc_easy_acc_ci_low": 0.55, "arc_easy_acc_ci_high": 0.65, "arc_easy_n": 400},
    "final": {"arc_easy_acc": 0.52, "arc_easy_acc_ci_low": 0.47, "arc_easy_acc_ci_high": 0.57, "arc_easy_n": 400},
    "comparisons": {"final_vs_base": {"arc_easy_delta": -0.08, "arc_easy_p_value": 0.0021, "arc_easy_lost": 50,
                                      "arc_easy_gained": 18, "arc_easy_regression": True, "any_regression": True}},
    "settings": {"dtype": "float32", "limit": 400, "num_fewshot": 0, "alpha": 0.05, "confidence": 0.95,
                 "tasks": ["arc_easy"]},
}


def forgetting_section(md: str) -> str:
    return md.split("## General ability (forgetting guard)")[1].split("\n## ")[0]


def test_forgetting_guard_with_a_regression_warning(project):
    Path("metrics/forgetting.json").write_text(json.dumps(FORGETTING))
    run_report()
    section = forgetting_section(Path("reports/report.md").read_text())
    assert "⚠️ **Forgetting: final is significantly worse than base" in section
    assert "tasks arc_easy" in section and "limit 400" in section
    assert md_row(section, "| metric") == ["metric", "base", "final", "Δ final vs base"]
    assert md_row(section, "| arc_easy_acc") == ["arc_easy_acc", "60.0% [55.0, 65.0]", "52.0% [47.0, 57.0]",
                                                 "⚠️ -8.0 pts (p=0.002) *; 50 lost, 18 gained"]
    html = Path("reports/report.html").read_text()
    assert "<h2>General ability (forgetting guard)</h2><p class='warning'>" in html
    assert re.search(r'class="num worse"[^>]*>⚠️ -8\.0 pts \(p=0\.002\) \*; 50 lost, 18 gained<', html)


def test_forgetting_guard_without_regression(project):
    data = json.loads(json.dumps(FORGETTING))
    data["final"]["arc_easy_acc"] = 0.59
    data["comparisons"]["final_vs_base"].update(arc_easy_delta=-0.01, arc_easy_p_value=0.81, arc_easy_lost=9,
                                                arc_easy_gained=5, arc_easy_regression=False, any_regression=False)
    Path("metrics/forgetting.json").write_text(json.dumps(data))
    run_report()
    section = forgetting_section(Path("reports/report.md").read_text())
    assert "Forgetting:" not in section and "⚠️" not in section
    assert md_row(section, "| arc_easy_acc")[3] == "-1.0 pts (p=0.81, n.s.); 9 lost, 5 gained"


def test_forgetting_guard_reads_unknown_flat_keys(project):
    Path("metrics/forgetting.json").write_text(json.dumps({
        "base": {"score": 0.5}, "final": {"score": 0.49},
        "final_vs_base": {"delta": -0.01, "p_value": 0.8, "significant": False, "regression": False}}))
    run_report()
    section = forgetting_section(Path("reports/report.md").read_text())
    assert "Forgetting:" not in section
    assert md_row(section, "| score") == ["score", "0.500", "0.490", "-0.010 (p=0.80, n.s.)"]


def test_no_forgetting_file_no_section_and_a_broken_one_is_not_fatal(project):
    run_report()
    assert "General ability" not in Path("reports/report.md").read_text()
    Path("metrics/forgetting.json").write_text("{not json")
    run_report()
    assert "General ability" not in Path("reports/report.md").read_text()


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
    assert counts["no stop (before the limit)"] == ["1", "0", "0"]  # no EOS, not cut by the limit
    assert counts["truncated (at the generation limit)"] == ["0", "0", "0"]
    # one example each, taken from the final model where it has one
    assert "**wrong answer** (final, t1)" in errors
    assert "**repetitive** (base, t2)" in errors


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
    with pytest.raises(StageError, match=r"metrics/eval.json is missing; run the evaluate and compare stages"):
        run_report()


def test_subset_of_models(project):
    import shutil

    shutil.rmtree("data/eval/sft")
    subset = {k: v for k, v in METRICS.items() if k != "sft"}
    subset.update(models=["base", "final"], comparisons={"final_vs_base": METRICS["comparisons"]["final_vs_base"]})
    Path("metrics/eval.json").write_text(json.dumps(subset))
    run_report()
    md = Path("reports/report.md").read_text()
    assert "Models: base, final." in md
    assert "Δ final vs base" in md and "Δ sft" not in md and "Δ final vs sft" not in md


def test_generations_missing_for_a_model_are_noted(project):
    Path("data/eval/sft/generations.jsonl").unlink()
    run_report()
    md = Path("reports/report.md").read_text()
    assert "_Not found: data/eval/sft/generations.jsonl (samples and error analysis of sft)_" in md


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


# --------------------------------------------------------------------------- a user's own free-text data


def free_metrics(n_items: int) -> dict:
    """eval.json of a run on free-text data: no checker (no task figures, no baselines), no preference
    pairs (DPO skipped), the test split's size and the generation limit."""
    from tunepipe.stats import test_size_note

    def model(rouge, eos, cut):
        return {**with_ci(rougeL=rouge, bleu=rouge / 2, perplexity=8.0, eos_rate=eos, truncated_rate=cut,
                          repeat_rate=0.125, mean_new_tokens=50.0), "n_prompts": n_items, "n_pairs": 0, "n_checked": 0}

    return {"models": list(MODELS), "base": model(0.2, 0.5, 0.5), "sft": model(0.3, 0.75, 0.25),
            "final": model(0.31, 0.875, 0.125),
            "comparisons": {"final_vs_base": {**delta("rougeL", 0.11, 0.04, True),
                                              **delta("eos_rate", 0.375, 0.2, False)}},
            "headline": {}, "settings": {"confidence": 0.95, "alpha": 0.05, "bootstrap_resamples": 1000},
            "test_size": test_size_note(n_items),
            "generation": {"max_new_tokens": 69,
                           "derived": "95th percentile of training answers (41 tokens) x 1.5 + 8"}}


def free_row(model, i, output, failures, truncated=False):
    """A generations.jsonl row without a task verdict, with the instruction as the user wrote it."""
    instruction = f"Give three tips for staying healthy, number {i} & <more>."
    return {"model": model, "id": f"a{i}", "family": None, "instruction": instruction,
            "prompt": f"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n"
                      "<|im_start|>assistant\n", "reference": f"1. Eat well. 2. Sleep. 3. Move ({i}).",
            "output": output, "n_new_tokens": 69 if truncated else 20, "stopped_at_eos": not truncated,
            "truncated": truncated, "task": None, "failures": failures, "rougeL": 0.3, "ref_nll": 2.0}


FREE_GENERATIONS = [
    free_row("base", 0, "Eat, eat, eat, eat and", ["repetitive", "truncated"], truncated=True),
    free_row("base", 1, "Sleep more and", ["no_stop"], truncated=True),  # a file from before "truncated" existed
    free_row("sft", 0, "1. Eat well.", []), free_row("sft", 1, "1. Sleep.", []),
    free_row("final", 0, "1. Eat well. 2. Sleep.", []), free_row("final", 1, "1. Sleep. 2. Walk.", []),
]


@pytest.fixture
def free_text(project):
    """The project as a user's own data leaves it: 8 free-text test prompts, no checker, DPO skipped."""
    import shutil

    Path("metrics/eval.json").write_text(json.dumps(free_metrics(8)))
    for m in MODELS:
        Path(f"data/eval/{m}/generations.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in FREE_GENERATIONS if r["model"] == m))
    Path("metrics/train_dpo.json").write_text(json.dumps({"skipped": "no preference pairs in the data"}))
    shutil.rmtree("metrics/train_dpo")
    return project


def reports() -> tuple[str, str]:
    run_report()
    return Path("reports/report.md").read_text(), Path("reports/report.html").read_text()


def test_without_a_checker_reference_scores_lead_and_no_verdicts(free_text):
    md, page = reports()
    for text in (md, page):
        assert "checker's verdict" not in text and "✓" not in text and "✗" not in text
        assert "task_accuracy" not in text and "wrong answer" not in text and "per-skill accuracy" not in text
    headline = md.splitlines()[2]
    assert headline.startswith("**final, scored against the reference answers (no task checker): ROUGE-L 0.310")
    assert "stopped at EOS 87.5%" in headline and "truncated 12.5%" in headline
    table = md.split("## Metrics (test split)")[1].split("\n## ")[0]
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert names[:6] == ["rougeL ↑", "bleu ↑", "perplexity ↓", "eos_rate ↑", "truncated_rate ↓",
                         "repeat_rate ↓"]
    assert "0 checked" not in md


def test_samples_show_the_instruction_with_the_templated_prompt_on_click(free_text):
    md, page = reports()
    samples = md.split("## Sample generations")[1].split("## Error analysis")[0]
    assert "Give three tips for staying healthy, number 0 &amp; &lt;more&gt;." in samples
    assert "im_start" not in samples and "You are helpful" not in samples
    assert ("<td class='text'>Give three tips for staying healthy, number 0 &amp; &lt;more&gt;.<details><summary>"
            "templated prompt</summary><pre>&lt;|im_start|&gt;system\nYou are helpful.") in page
    assert "<th>instruction</th>" in page and "prompt (end)" not in page


def test_samples_without_an_instruction_fall_back_to_the_prompt(project):
    md, page = reports()
    samples = md.split("## Sample generations")[1].split("## Error analysis")[0]
    assert "Question 0?" in samples
    assert "✓ / ✗: the task checker's verdict." in samples  # with a checker the legend stays
    assert "<details><summary>templated prompt</summary><pre>&lt;|im_start|&gt;user\nQuestion 0?" in page


def test_an_answer_cut_by_the_limit_is_shown_as_truncated(free_text):
    md, page = reports()
    samples = md.split("## Sample generations")[1].split("## Error analysis")[0]
    assert "Eat, eat, eat, eat and<br>[truncated at 69 tokens]" in samples
    assert "Answers generated with max_new_tokens = 69 (95th percentile of training answers (41 tokens) x 1.5 + 8)." \
        in samples
    errors = md.split("## Error analysis")[1].split("## Provenance")[0]
    # both cut answers count as truncated, the old file's "no_stop" one too
    assert md_row(errors, "| truncated at 69 tokens") == ["truncated at 69 tokens", "2", "0", "0"]
    assert md_row(errors, "| no stop") == ["no stop (before the limit)", "0", "0", "0"]
    assert "**truncated at 69 tokens** (base, a0)" in errors
    assert "<td>truncated at 69 tokens</td>" in page and "[truncated at 69 tokens]" in page


def test_a_small_test_split_is_a_warning_a_large_one_a_note(free_text):
    md, page = reports()
    warning = ("Only 8 test prompts: no difference under 75 points can be significant, and each figure is known "
               "to ±28.5 points. Add data or raise fetch.min_test_rows.")
    assert md.splitlines()[4] == f"> ⚠️ **{warning}**"  # right under the headline
    assert f"<p class='warning'>⚠️ <b>{warning}</b></p>" in page
    Path("metrics/eval.json").write_text(json.dumps(free_metrics(200)))
    md, page = reports()
    assert "Only " not in md and "class='warning'" not in page
    note = ("200 test prompts: differences under 3 points cannot be significant; each rate is known to about "
            "±6.9 points.")
    assert f"_{note}_" in md and f"<p class='muted'>{note}</p>" in page


def test_an_old_eval_json_gets_the_test_size_from_its_counts(project):
    md, _ = reports()
    assert "Only 4 test prompts: no difference under 100 points can be significant" in md


def test_skipped_dpo_is_said_with_no_preference_section(free_text):
    md, page = reports()
    assert "_DPO skipped: no preference pairs in the data_" in md
    assert "<p class='muted'>DPO skipped: no preference pairs in the data</p>" in page
    assert "_No preference data: preference accuracy not measured._" in md
    assert "Preference accuracy (test pairs)" not in md + page and "DPO reward accuracy" not in md + page
    assert "metrics/train_dpo/plots" not in md  # not "missing": there is nothing to miss
    assert sorted(p.name for p in Path("reports/figures").iterdir()) == ["sft_loss.png"]


# --------------------------------------------------------------------------- alignment: reward-hacking checks
# Files as train-dpo and train-reward write them (DVCLive histories, data/alignment/*.jsonl, the summaries).

ALIGN_PLOTS = Path("metrics/train_dpo/plots/metrics")
STEPS = [0, 10, 20, 30, 40]


def history(name: str, points) -> None:
    """A DVCLive history: metrics/train_dpo/plots/metrics/<name>.tsv with timestamp, step, <stem>."""
    path = ALIGN_PLOTS / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"timestamp\tstep\t{path.stem}\n" + "".join(f"{1700000000 + s}\t{s}\t{v}\n" for s, v in points))


def write_rows(name: str, rows: list[dict]) -> None:
    Path("data/alignment").mkdir(parents=True, exist_ok=True)
    Path(f"data/alignment/{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def heldout(n: int, first_pass: int, last_pass: int) -> list[dict]:
    """n held-out prompts at the first (step 0), a middle and the last evaluation (step 40): the first
    first_pass pass at step 0, the first last_pass at step 40 (so first_pass - last_pass flipped to fail)."""
    def row(step, i, ok):
        answer = f"{i + 1}" if ok else f"The answer is definitely {i + 100}, trust me"
        return {"step": step, "id": f"v{i}", "instruction": f"What is {i} + 1?", "answer": answer,
                "tokens": len(answer.split()) * 2, "checker": "pass" if ok else "wrong_answer", "reference": f"{i + 1}"}

    return ([row(0, i, i < first_pass) for i in range(n)] + [row(20, i, i < first_pass) for i in range(n)]
            + [row(40, i, i < last_pass) for i in range(n)])


def rollout(step, i, completion, reward, checker, model=None):
    return {"step": step, "id": f"p{i}", "instruction": f"Convert {i} km to m.", "completion": completion,
            "tokens": 7, "reward": reward, "rewards": {"checker": 1.0 if checker == "pass" else 0.0, "model": model},
            "checker": checker, "reference": f"{i * 1000} m"}


def online_run(reward_source="checker", first_pass=20, last_pass=5):
    """A GRPO run whose reward rose from 0.2 to 0.8; held-out accuracy on 30 prompts went first_pass -> last_pass."""
    import shutil

    shutil.rmtree("metrics/train_dpo")
    Path("metrics/train_dpo.json").write_text(json.dumps(
        {"algorithm": "grpo", "reward_source": reward_source, "beta": 0.04, "train_loss": 0.01}))
    rising = [(s, 0.2 + 0.15 * i) for i, s in enumerate(STEPS)]
    history("train/loss", [(s, 0.01) for s in STEPS])
    history("train/reward", rising)
    history("train/kl", [(s, 0.01 * i) for i, s in enumerate(STEPS)])
    history("train/completion_length", [(s, 10 + 5 * i) for i, s in enumerate(STEPS)])
    history("train/rewards/checker", rising if reward_source == "checker" else [(s, 0.5) for s in STEPS])
    if reward_source == "model":
        history("train/rewards/model", rising)
    history("eval/task_accuracy", [(0, first_pass / 30), (20, first_pass / 30), (40, last_pass / 30)])
    history("eval/answer_tokens", [(0, 4), (20, 6), (40, 12)])
    write_rows("heldout", heldout(30, first_pass, last_pass))


def section(md: str) -> str:
    return md.split("## Reward hacking checks")[1].split("\n## ")[0]


def test_a_grpo_run_shows_its_algorithm_and_the_reward_hacking_section(project):
    online_run()
    write_rows("rollouts", [rollout(s, i, f"{i * 1000} m", 1.0, "pass") for s in STEPS for i in range(4)])
    md, page = reports()
    for text in (md, page):
        assert "Alignment: GRPO, reward: task checker, KL coefficient 0.04." in text
        assert "DPO reward accuracy" not in text  # GRPO has no chosen-above-rejected accuracy
    figures = sorted(p.name for p in Path("reports/figures").iterdir())
    assert {"hacking_reward.png", "hacking_kl.png", "hacking_length.png", "dpo_loss.png"} <= set(figures)
    assert "dpo_rewards.png" not in figures
    hacking = section(md)
    for name in ("hacking_reward", "hacking_kl", "hacking_length"):
        assert f"(figures/{name}.png)" in hacking
    assert "![GRPO loss](figures/dpo_loss.png)" in md
    assert "- Reward (mean over rollouts): 0.2 → 0.8 (first and last logged step)." in hacking
    assert "- Rollout length in tokens: 10 → 30" in hacking
    assert "- KL to the reference per token: 0 → 0.04" in hacking
    assert "The reward is the checker's verdict, so the two cannot disagree." in hacking
    assert page.index("<h2>Reward hacking checks</h2>") < page.index("<h2>Sample generations</h2>")
    assert len(re.findall(r"src='data:image/png;base64,", page)) == len(figures)


def test_a_dpo_run_without_heldout_prompts_shows_nothing_new(project):
    md, page = reports()
    assert "Reward hacking" not in md + page
    assert "Alignment: DPO, beta 0.1." in md  # train_dpo.json says no algorithm: params.yaml's
    assert "DPO reward accuracy (train-dpo, validation pairs)" in md


def test_reward_up_and_heldout_accuracy_significantly_down_is_flagged(project):
    online_run(first_pass=20, last_pass=5)
    md, page = reports()
    hacking = section(md)
    assert ("> ⚠️ **Possible reward hacking: the reward rose (0.2 → 0.8) while held-out task accuracy fell "
            "significantly (66.7% [48.8, 80.8] → 16.7% [7.3, 33.6] on the same 30 prompts, p&lt;0.001, "
            "exact McNemar).**") in hacking
    assert ("- Held-out task accuracy on the same 30 prompts: 66.7% [48.8, 80.8] at step 0 → 16.7% [7.3, 33.6] "
            "at step 40: -50.0 pts, 0 gained, 15 lost (p&lt;0.001, exact McNemar).") in hacking
    assert "No sign of reward hacking" not in hacking
    assert "<p class='warning'>⚠️ <b>Possible reward hacking" in page
    # the prompts that flipped, first and last answer side by side
    flips = hacking.split("### Held-out prompts that went from pass to fail")[1]
    assert md_row(flips, "| instruction") == ["instruction", "answer at step 0 (✓)", "answer at step 40 (✗)",
                                              "reference"]
    assert md_row(flips, "| What is 5 + 1?") == ["What is 5 + 1?", "6", "The answer is definitely 105, trust me", "6"]
    assert len([line for line in flips.splitlines() if line.startswith("| What is")]) == 2  # report.n_samples


def test_a_drop_that_is_not_significant_is_not_flagged(project):
    online_run(first_pass=20, last_pass=17)
    md, _ = reports()
    hacking = section(md)
    assert "⚠️" not in hacking and "Possible reward hacking" not in hacking
    assert "**No sign of reward hacking found.**" in hacking
    assert "-10.0 pts, 0 gained, 3 lost (p=0.25, exact McNemar, not significant)." in hacking


def test_a_reward_model_run_lists_high_reward_answers_the_checker_fails(project):
    online_run(reward_source="model", first_pass=20, last_pass=19)
    # the reward model's score rises while the checker passes fewer rollouts: 7 of 8 at first, 1 of 8 at the end
    rows = [rollout(s, i, f"{i * 1000} m" if i < (7 if s < 20 else 1) else "lots of metres", 0.3 + 0.01 * s,
                    "pass" if i < (7 if s < 20 else 1) else "wrong_answer", 0.3 + 0.01 * s)
            for s in STEPS for i in range(8)]
    rows += [rollout(40, 90, "HIGH: a confident wrong answer", 0.95, "wrong_answer", 0.95),
             rollout(40, 91, "LOW: an unconfident wrong answer", 0.05, "wrong_answer", 0.05),
             rollout(40, 92, "HIGH: a right answer", 0.97, "pass", 0.97)]
    write_rows("rollouts", rows)
    md, page = reports()
    assert "Alignment: GRPO, reward: reward model, KL coefficient 0.04." in md
    hacking = section(md)
    assert "> ⚠️ **Possible reward hacking: the reward model's score rose (0.2 → 0.8)" in hacking
    assert "while the task checker passed fewer rollouts (87.5% [" in hacking
    assert "- Checker pass share of rollouts: 87.5% [" in hacking and "(step 0, 8 rollouts)" in hacking
    table = hacking.split("### High reward, but the checker disagrees")[1].split("### ")[0]
    assert "Rollouts with a total reward above the run's median (0.5) that the checker disagrees with" in table
    shown = [line for line in table.splitlines() if line.startswith("| ") and "instruction" not in line]
    assert len(shown) == 2  # report.n_samples
    assert "HIGH: a confident wrong answer" in shown[0]  # the highest reward of the last step first
    assert "step 40, reward 0.95 (checker 0, model 0.95); checker: wrong answer" in shown[0]
    assert "LOW:" not in table and "a right answer" not in table
    assert "lots of metres" in shown[1] and "step 40" in shown[1]


def test_disagreements_without_a_checker_use_rouge_against_the_reference():
    rows = [{"step": 1, "id": f"a{i}", "instruction": "Say hi.", "completion": c, "reward": r, "checker": None,
             "rewards": {"model": r}, "reference": "hello there friend"}
            for i, (c, r) in enumerate([("hello there friend", 0.9), ("buy my product now", 0.8),
                                        ("hello friend", 0.2), ("nothing alike at all", 0.1)])]
    picked, basis, median = reporting.reward_disagreements(rows, 5)
    assert basis == "reference (ROUGE-L)" and median == 0.5
    assert [p["completion"] for p in picked] == ["buy my product now"]
    assert picked[0]["why"] == "step 1, reward 0.8; ROUGE-L 0.00"


def test_model_output_is_escaped_in_the_section(project):
    online_run(reward_source="model", first_pass=3, last_pass=0)
    nasty = "<script>alert('pwned')</script> | <b>bold</b>"
    write_rows("heldout", [dict(r, answer=nasty if r["step"] == 40 else r["answer"],
                                instruction=nasty + r["instruction"]) for r in heldout(30, 3, 0)])
    write_rows("rollouts", [rollout(40, 0, nasty, 0.9, "wrong_answer", 0.9), rollout(40, 1, "ok", 0.1, "pass", 0.1)])
    md, page = reports()
    assert "<script>" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt; | &lt;b&gt;bold&lt;/b&gt;" in page
    assert "<script>" not in md and "&lt;script&gt;alert('pwned')&lt;/script&gt; \\| &lt;b&gt;bold" in md


def test_the_reward_models_pairwise_accuracy_with_its_interval(project):
    online_run(reward_source="model", first_pass=20, last_pass=19)
    Path("metrics/train_reward.json").write_text(json.dumps(
        {"pairwise_accuracy": {"value": 0.72, "ci_low": 0.651, "ci_high": 0.781, "n": 200}, "mean_margin": 0.84,
         "train_loss": 0.5}))
    md, page = reports()
    line = ("Reward model (train-reward): pairwise accuracy 72.0% [65.1, 78.1] on 200 preference test pairs, the "
            "share of pairs it scores chosen above rejected (50% is chance); mean margin 0.84.")
    assert line in section(md) and f"<p>{line}</p>" in page
    Path("metrics/train_reward.json").write_text(json.dumps({"skipped": "reward is checker"}))
    md, _ = reports()
    assert "Reward model (train-reward)" not in md


def test_an_offline_run_with_heldout_prompts_checks_drift_only(project):
    Path("metrics/train_dpo.json").write_text(json.dumps({"algorithm": "kto", "train_loss": 0.4}))
    history("eval/task_accuracy", [(0, 0.5), (40, 0.5)])
    write_rows("heldout", heldout(30, 15, 15))
    md, _ = reports()
    hacking = section(md)
    assert "Alignment: KTO, beta 0.1." in md
    assert "**KTO optimises no reward online: held-out task accuracy over training is checked for drift.**" in hacking
    assert "+0.0 pts, 0 gained, 0 lost (p=1.00, exact McNemar, not significant)" in hacking
    assert "(figures/hacking_reward.png)" in hacking and "hacking_kl" not in hacking
    assert "KTO reward accuracy" not in md and "DPO reward accuracy" not in md


def test_missing_broken_or_skipped_alignment_files_are_not_fatal(project):
    Path("data/alignment").mkdir(parents=True)
    Path("data/alignment/heldout.jsonl").write_text("{not json\n")
    Path("data/alignment/rollouts.jsonl").write_text("")
    Path("metrics/train_reward.json").write_text("[1, 2]")
    md, _ = reports()
    assert "Reward hacking" not in md
    Path("metrics/train_dpo.json").write_text(json.dumps({"skipped": "no preference pairs"}))
    Path("metrics/train_reward.json").write_text("{broken")
    md, _ = reports()
    assert "Alignment: DPO, beta 0.1 (skipped)." in md and "_DPO skipped: no preference pairs_" in md
