"""The compare stage on constructed evaluation files whose figures are known by construction."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from statistics import NormalDist

import pytest

from tunepipe.params import Params

N = 96
UNCHECKED = {92, 93, 94, 95}           # records without a checker: no task verdict
CHECKED = N - len(UNCHECKED)
FAMILIES = ("arithmetic", "text", "lists", "units", "format")
KINDS = ("wrong_answer", "ignored_constraint", "rambling", "repetition", "no_stop")
PASSES = {"base": set(range(16)), "sft": set(range(37)), "final": set(range(35)) | {40, 41, 42}}
CONSTANT_PASSES = set(range(10))       # the stand-in constant baseline answers these right


def family(i: int) -> str:
    return FAMILIES[i % 5]


def meta(i: int) -> dict:
    m = {"family": family(i)}
    if i not in UNCHECKED:
        m["check"] = {"type": "exact", "answer": f"answer {i}"}
    return m


def prompt(i: int) -> str:
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQuestion {i}: "
            f"what is the answer?<|im_end|>\n<|im_start|>assistant\n")


def gen_rows(model: str) -> list[dict]:
    rows = []
    for i in range(N):
        ok = i in PASSES[model]
        task = None if i in UNCHECKED else "pass" if ok else "wrong_answer"
        output = f"answer {i}" if ok else "I am not sure, let me think about it " * (3 if model == "base" else 1)
        rows.append({
            "model": model, "id": f"t{i}", "family": family(i), "prompt": prompt(i), "reference": f"answer {i}",
            "output": output, "n_new_tokens": 30 if model == "base" else 4,
            "stopped_at_eos": model != "base" or i % 2 == 0, "truncated": model == "base" and i % 2 == 1,
            "task": task, "failures": ([] if task in ("pass", None) else [task])
            + (["repetitive"] if model == "base" and i % 4 == 0 else []),
            **rouge(model, i), "ref_tokens": i % 7 + 1,
            "ref_logp": -nll(model, i) * (i % 7 + 1), "ref_nll": nll(model, i)})
    return rows


def rouge(model: str, i: int) -> dict:
    # sft varies per item; final is sft + 0.1 on every item (a constant paired shift)
    r = {"base": 0.25, "sft": (i % 5) / 5, "final": (i % 5) / 5 + 0.1}[model]
    return {"rouge1": r, "rouge2": r / 2, "rougeL": r, "rougeLsum": r}


def nll(model: str, i: int) -> float:
    return {"base": 2.0, "sft": 0.5 + (i % 3) / 10, "final": 0.5 + (i % 3) / 10}[model]


def pref_rows(model: str) -> list[dict]:
    rows = []
    for i in range(N):
        kind = KINDS[i % 5]
        # rambling: longer, so lower summed log-prob but higher per token (-0.5 vs -1)
        rejected = {"rambling": (-20.0, 40),
                    "wrong_answer": (-3.0 if model == "base" else -10.0, 5)}.get(kind, (-10.0, 5))
        rows.append({"model": model, "id": f"p{i}", "family": family(i), "rejected_kind": kind,
                     "chosen_logp": -5.0, "rejected_logp": rejected[0], "chosen_tokens": 5,
                     "rejected_tokens": rejected[1], "margin": -5.0 - rejected[0], "correct": -5.0 > rejected[0]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_evaluation(root: Path, models=("base", "sft", "final")) -> None:
    """data/eval/<model>/ and data/templated/sft_{train,test}.jsonl as the evaluate and template stages write them."""
    for m in models:
        write_jsonl(root / f"data/eval/{m}/generations.jsonl", gen_rows(m))
        write_jsonl(root / f"data/eval/{m}/preferences.jsonl", pref_rows(m))
    write_jsonl(root / "data/templated/sft_test.jsonl",
                [{"id": f"t{i}", "prompt": prompt(i), "completion": f"answer {i}", "meta": meta(i)} for i in range(N)])
    write_jsonl(root / "data/templated/sft_train.jsonl",
                [{"id": f"x{i}", "prompt": "q", "completion": "a", "meta": meta(i)} for i in range(20)])


def stand_in_tasks(monkeypatch) -> None:
    """tasks.check / trivial_baselines / random_choice_accuracy with known answers."""
    from tunepipe import tasks

    def check(m, output):
        return None if output == m["check"]["answer"] else "wrong_answer"

    def trivial_baselines(train_metas, test_metas):
        assert len(train_metas) == 20  # it is given the training records' metas
        return {"constant": [None if "check" not in m else m["check"]["answer"]
                             if int(m["check"]["answer"].split()[1]) in CONSTANT_PASSES else "no" for m in test_metas]}

    monkeypatch.setattr(tasks, "check", check)
    monkeypatch.setattr(tasks, "trivial_baselines", trivial_baselines, raising=False)
    monkeypatch.setattr(tasks, "random_choice_accuracy", lambda m: 0.5 if m["family"] == "text" else 0.0,
                        raising=False)


@pytest.fixture
def evaluated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_evaluation(tmp_path)
    stand_in_tasks(monkeypatch)
    return tmp_path


def run_compare(**compare):
    from stages import compare as stage

    stage.main(Params.model_validate({"compare": compare} if compare else {}))
    return json.loads(Path("metrics/eval.json").read_text())


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval from its closed form (independent of scipy)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


# --------------------------------------------------------------------------- per model


def test_accuracy_with_wilson_interval_per_model_and_family(evaluated):
    out = run_compare()
    assert out["models"] == ["base", "sft", "final"]
    final = out["final"]
    assert final["task_accuracy"] == round(38 / CHECKED, 4)
    low, high = wilson(38, CHECKED)
    assert (final["task_accuracy_ci_low"], final["task_accuracy_ci_high"]) == (round(low, 4), round(high, 4))
    assert final["n_prompts"] == N and final["n_checked"] == CHECKED and final["n_pairs"] == N
    text = [i for i in range(CHECKED) if family(i) == "text"]
    passed = sum(i in PASSES["final"] for i in text)
    assert final["acc_text"] == round(passed / len(text), 4)
    assert final["acc_text_ci_low"] == round(wilson(passed, len(text))[0], 4)


def test_means_and_corpus_statistics_with_bootstrap_intervals(evaluated):
    from tunepipe import metrics

    out = run_compare()
    sft = out["sft"]
    assert sft["rougeL"] == round(sum((i % 5) / 5 for i in range(N)) / N, 4)
    assert 0 < sft["rougeL_ci_low"] < sft["rougeL"] < sft["rougeL_ci_high"] < 0.8
    # every base item has the same NLL and ROUGE: any resample gives the same figure
    assert out["base"]["perplexity"] == out["base"]["perplexity_ci_low"] == round(math.exp(2.0), 4)
    assert out["base"]["rougeL_ci_low"] == out["base"]["rougeL_ci_high"] == 0.25
    tokens = [i % 7 + 1 for i in range(N)]
    ppl = math.exp(sum(nll("sft", i) * t for i, t in enumerate(tokens)) / sum(tokens))
    assert sft["perplexity"] == round(ppl, 4)
    rows = gen_rows("final")
    assert out["final"]["bleu"] == round(metrics.bleu([r["output"] for r in rows], [r["reference"] for r in rows]), 4)
    assert out["final"]["bleu_ci_low"] < out["final"]["bleu"] < out["final"]["bleu_ci_high"]


def test_preference_accuracy_summed_normalised_and_per_kind(evaluated):
    out = run_compare()
    n_wrong, n_rambling = sum(i % 5 == 0 for i in range(N)), sum(i % 5 == 2 for i in range(N))
    assert out["base"]["pref_accuracy"] == round((N - n_wrong) / N, 4)
    assert out["base"]["pref_accuracy_norm"] == round((N - n_wrong - n_rambling) / N, 4)
    assert out["sft"]["pref_accuracy"] == 1.0 and out["sft"]["pref_accuracy_norm"] == round((N - n_rambling) / N, 4)
    assert out["sft"]["pref_acc_rambling"] == 1.0 and out["sft"]["pref_acc_norm_rambling"] == 0.0
    assert out["sft"]["pref_acc_norm_rambling_ci_high"] == round(wilson(0, n_rambling)[1], 4)


def test_health_rates(evaluated):
    base = run_compare()["base"]
    assert (base["eos_rate"], base["truncated_rate"], base["repeat_rate"]) == (0.5, 0.5, 0.25)
    assert base["mean_new_tokens"] == base["mean_new_tokens_ci_low"] == 30.0
    assert (base["eos_rate_ci_low"], base["eos_rate_ci_high"]) == tuple(round(v, 4) for v in wilson(48, 96))


# --------------------------------------------------------------------------- comparisons, baselines, headline


def test_paired_comparisons_mcnemar_and_bootstrap(evaluated):
    out = run_compare()
    assert set(out["comparisons"]) == {"sft_vs_base", "final_vs_sft", "final_vs_base"}
    fb = out["comparisons"]["final_vs_base"]
    assert fb["task_accuracy_delta"] == round((38 - 16) / CHECKED, 4)
    assert fb["task_accuracy_p_value"] == round(2 * 0.5 ** 22, 4) and fb["task_accuracy_significant"] is True
    assert fb["n_paired"] == N
    fs = out["comparisons"]["final_vs_sft"]
    # discordant: final alone passes 40-42, sft alone 35-36: binomial(3 of 5), two-sided p = 1
    assert fs["task_accuracy_p_value"] == 1.0 and fs["task_accuracy_significant"] is False
    # final's ROUGE is sft's + 0.1 on every item: every resample has delta 0.1, p is the smallest possible
    assert fs["rougeL_delta"] == fs["rougeL_delta_ci_low"] == fs["rougeL_delta_ci_high"] == 0.1
    assert fs["rougeL_p_value"] == round(2 / 1001, 4) and fs["rougeL_significant"] is True
    assert fs["perplexity_delta"] == 0.0 and fs["perplexity_p_value"] == 1.0


def test_alpha_decides_significance(evaluated):
    out = run_compare(alpha=0.001)
    fs = out["comparisons"]["final_vs_sft"]
    assert fs["rougeL_p_value"] > 0.001 and fs["rougeL_significant"] is False
    assert out["settings"]["alpha"] == 0.001


def test_trivial_baselines_and_headline(evaluated):
    out = run_compare()
    const = out["baseline_constant"]
    assert const["task_accuracy"] == round(10 / CHECKED, 4)
    assert const["task_accuracy_ci_high"] == round(wilson(10, CHECKED)[1], 4)
    text = [i for i in range(CHECKED) if family(i) == "text"]
    assert out["baseline_random"]["task_accuracy"] == round(0.5 * len(text) / CHECKED, 4)
    assert out["baseline_random"]["acc_text"] == 0.5
    h = out["headline"]
    assert (h["model"], h["baseline"]) == ("final", "constant")
    assert h["delta"] == round(28 / CHECKED, 4)
    assert h["p_value"] == round(2 * 0.5 ** 28, 4) and h["significant"] is True
    assert h["delta_ci_low"] < h["delta"] < h["delta_ci_high"]
    assert h["text"].startswith(f"final: {28 / CHECKED * 100:.1f} points above the best trivial baseline (constant")
    assert "95% CI +" in h["text"] and "p<0.001" in h["text"]


def test_eval_json_is_flat_enough_for_dvc(evaluated):
    out = run_compare()
    for name in ("base", "sft", "final", "baseline_constant"):
        assert all(not isinstance(v, (dict, list)) for v in out[name].values())
    floats = [v for name in ("base", "final") for v in out[name].values() if isinstance(v, float)]
    assert all(round(v, 4) == v for v in floats)


def test_eval_items_holds_compact_per_item_lists(evaluated):
    run_compare()
    items = json.loads(Path("metrics/eval_items.json").read_text())
    assert Path("metrics/eval_items.json").stat().st_size < 150_000
    assert items["prompts"][3] == {"id": "t3", "prompt": "Question 3: what is the answer?", "reference": "answer 3"}
    final = items["models"]["final"]
    assert final["generations"][40] == {"id": "t40", "task": "pass", "output": "answer 40", "rougeL": 0.1,
                                        "ref_nll": nll("final", 40), "ref_tokens": 40 % 7 + 1}
    assert final["generations"][93]["task"] is None
    assert final["preferences"][2] == {"id": "p2", "correct": True, "correct_norm": False}  # rambling
    # `dvc metrics show` reads no number from it: every value sits inside a list
    assert all(isinstance(v, list) for m in items["models"].values() for v in m.values())


def test_long_outputs_are_cut(evaluated):
    rows = gen_rows("final")
    rows[50]["output"] = "x" * 1000
    write_jsonl(Path("data/eval/final/generations.jsonl"), rows)
    run_compare()
    items = json.loads(Path("metrics/eval_items.json").read_text())
    assert len(items["models"]["final"]["generations"][50]["output"]) == 200


# --------------------------------------------------------------------------- inputs and running


def test_missing_model_is_skipped_with_a_log_line(evaluated, caplog):
    import shutil

    shutil.rmtree("data/eval/sft")
    with caplog.at_level(logging.INFO, logger="tunepipe.compare"):
        out = run_compare()
    assert out["models"] == ["base", "final"] and "sft" not in out
    assert list(out["comparisons"]) == ["final_vs_base"]
    assert any("sft: no data/eval/sft/generations.jsonl; skipped" in r.message for r in caplog.records)


def test_missing_inputs_are_clear_errors(evaluated):
    import shutil

    from tunepipe.cli import StageError

    Path("data/templated/sft_train.jsonl").unlink()
    with pytest.raises(StageError, match=r"sft_train.jsonl is missing; run the template stage first"):
        run_compare()
    shutil.rmtree("data/eval")
    with pytest.raises(StageError, match=r"no evaluation results under data/eval/.*dvc repro evaluate"):
        run_compare()


def test_same_input_same_output_and_fast(evaluated):
    started = time.perf_counter()
    run_compare()
    elapsed = time.perf_counter() - started
    first = Path("metrics/eval.json").read_bytes(), Path("metrics/eval_items.json").read_bytes()
    run_compare()
    assert (Path("metrics/eval.json").read_bytes(), Path("metrics/eval_items.json").read_bytes()) == first
    assert elapsed < 10, f"compare took {elapsed:.1f} s on 3 models x 96 items"
    other = run_compare(seed=1)
    assert other["sft"]["rougeL_ci_low"] != json.loads(first[0])["sft"]["rougeL_ci_low"]  # the seed is used


def test_compare_stage_help_shows_usage():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "stages.compare", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert out.returncode == 0 and "python -m stages.compare" in out.stdout and "metrics/eval.json" in out.stdout


def test_real_task_baselines_on_generated_tasks(tmp_path, monkeypatch):
    # the real tasks.trivial_baselines / random_choice_accuracy / check, on generated records
    from tunepipe import tasks

    monkeypatch.chdir(tmp_path)
    test, train = tasks.generate_sft("test", 30, seed=1), tasks.generate_sft("train", 200, seed=1)
    write_jsonl(Path("data/templated/sft_test.jsonl"), [{**r, "prompt": r["instruction"]} for r in test])
    write_jsonl(Path("data/templated/sft_train.jsonl"), train)
    gens = [{"model": "final", "id": r["id"], "family": r["meta"]["family"], "prompt": r["instruction"],
             "reference": r["output"], "output": r["output"], "task": "pass", "failures": []} for r in test]
    write_jsonl(Path("data/eval/final/generations.jsonl"), gens)
    out = run_compare()
    constant = tasks.trivial_baselines([r["meta"] for r in train], [r["meta"] for r in test])["constant"]
    expected = sum(tasks.check(r["meta"], a) is None for r, a in zip(test, constant)) / len(test)
    assert out["baseline_constant"]["task_accuracy"] == round(expected, 4)
    chance = sum(tasks.random_choice_accuracy(r["meta"]) for r in test) / len(test)
    assert out["baseline_random"]["task_accuracy"] == round(chance, 4)
    assert out["final"]["task_accuracy"] == 1.0 and out["headline"]["model"] == "final"
    assert out["headline"]["delta"] == round(1.0 - max(expected, chance), 4)
