"""Smoke tests: the benchmark code paths run on the tiny model for 2 steps and give well-formed rows.

No timing is asserted (the machine is shared); only that each side really trained
or generated, that the rows carry every column, and that ratios are ratios.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.trainingdata import make_workdir, tiny_params

PEAK = {"fp32_gflops": 10.0, "bf16_gflops": 0.5, "bf16_over_fp32": 0.05, "threads": 1, "cpu_capability": "AVX2"}


@pytest.fixture(scope="module")
def bench_ws(tmp_path_factory, tiny_model_dir, smol_tokenizer):
    root = make_workdir(tmp_path_factory.mktemp("bench_ws"), tiny_model_dir, smol_tokenizer, n_sft=16, n_pref=8)
    params = tiny_params(train_sft={"batch_size": 4}, train_dpo={"batch_size": 2},
                         evaluate={"batch_size": 4, "max_new_tokens": "auto", "max_new_tokens_cap": 8})
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return root


def test_sft_rows_compare_baseline_and_ours(bench_ws, monkeypatch, tmp_path):
    from benchmarks import harness, sft

    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(harness, "SCRATCH", tmp_path)
    calls = []

    def worker(module, spec):  # the real subprocess path, with the tiny params
        calls.append(spec["variant"])
        return harness_run(module, dict(spec, params=str(bench_ws / "params.yaml")))

    harness_run = harness.run_worker
    monkeypatch.setattr(harness, "run_worker", worker)
    res = sft.main(steps=2, repeats=1, examples=16, ws=bench_ws, peak=PEAK)

    assert calls == ["baseline", "ours"]
    base, ours = res["rows"]
    assert (base["variant"], ours["variant"]) == ("baseline", "ours")
    assert set(sft.COLUMNS) <= set(ours)
    assert base["speedup"] == 1.0 and ours["speedup"] > 0
    assert base["checkpointing"] and not ours["checkpointing"]
    assert ours["padding_free"] and not base["padding_free"]
    # the baseline computes padding too; ours sends the system prompt once per batch
    assert ours["computed_share"] < 1 < base["computed_share"]
    assert len(res["losses"]["ours"]) == len(res["losses"]["baseline"]) == 2
    # B of LoRA starts at zero: the first step's loss is the base model's, padded or packed
    assert res["step1_loss_diff"] < 1e-3
    assert ours["mean_loss"] == pytest.approx(sum(res["losses"]["ours"]) / 2, abs=1e-4)
    assert res["loss_ok"] == (ours["mean_loss"] <= base["mean_loss"] + 1e-3)
    assert 0 < ours["mfu_fp32"] < ours["mfu_bf16"]
    harness.save_results("sft", res)
    assert harness.load_results()["sft"]["rows"][1]["variant"] == "ours"
    assert "| variant" in sft.report(res)


def test_dpo_worker_trains_both_sides(bench_ws, tmp_path):
    from benchmarks import dpo

    out = {}
    for variant in ("baseline", "ours"):
        scratch = tmp_path / variant
        scratch.mkdir()
        out[variant] = dpo.train_once({"workspace": str(bench_ws), "params": str(bench_ws / "params.yaml"),
                                       "steps": 2, "variant": variant, "scratch": str(scratch)})
    assert out["baseline"]["checkpointing"] and not out["baseline"]["precompute"]
    assert out["ours"]["precompute"] and not out["ours"]["checkpointing"]
    for r in out.values():
        assert r["steps"] == 2 and r["pairs"] == 4 and len(r["losses"]) == 2
        assert r["pairs_per_s"] > 0 and r["pairs_per_s_end_to_end"] > 0


def test_generate_compares_naive_batched_and_ours(bench_ws, tmp_path):
    from benchmarks import generate

    r = generate.measure({"workspace": str(bench_ws), "params": str(bench_ws / "params.yaml"),
                          "prompts": 6, "repeats": 1})
    assert r["n_prompts"] == 6 and r["batch_size"] == 4
    assert r["max_new_tokens"] == 8  # "auto" resolved from the training answers as evaluate does (here: the cap)
    for side in ("naive", "generate_batched", "ours"):
        (run,) = r["runs"][side]
        assert 0 < run["tokens"] <= 6 * 8 and run["tokens_per_s"] > 0
        assert run["tokens"] == r["runs"]["naive"][0]["tokens"]
    assert r["mismatches"] == {"generate_batched": [], "ours": []}


def test_table_formats_every_column():
    from benchmarks.harness import ratio, table

    text = table([{"a": 1.23456, "b": None}, {"a": 12345.6, "b": "x"}], ["a", "b"])
    lines = text.splitlines()
    assert lines[0].split("|")[1].strip() == "a" and "1.235" in lines[2] and "12346" in lines[3] and "-" in lines[2]
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 0) is None


def test_results_keep_one_entry_per_workload_and_machine(monkeypatch, tmp_path):
    """A run on another CPU, or of another workload, adds to results.json; the same one replaces its own."""
    from benchmarks import harness

    path = tmp_path / "results.json"
    amd = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "bf16_flags": "avx512_bf16", "cores": 2, "load_avg_1m": 0.3}
    intel = dict(amd, cpu="Intel(R) Xeon(R) Platinum", bf16_flags="avx512_bf16")
    monkeypatch.setattr(harness, "machine", lambda: amd)
    harness.save_results("sft", {"speedup": 3.4}, path)
    harness.save_results("sft", {"speedup": 3.3}, path)  # same machine and workload: replaced
    harness.save_results("sft", {"speedup": 4.0}, path, workload="long-answers")
    monkeypatch.setattr(harness, "machine", lambda: intel)
    harness.save_results("sft", {"speedup": 2.1}, path)

    entries = harness.load_history(path)["entries"]
    assert len(entries) == 3
    assert harness.load_results(path=path)["sft"]["speedup"] == 2.1
    monkeypatch.setattr(harness, "machine", lambda: amd)
    mine = harness.load_results(path=path)
    assert mine["sft"]["speedup"] == 3.3 and mine["machine"]["cpu"] == "AMD EPYC" and mine["workload"] == "default"
    assert set(mine["sft"]["recorded"]) == {"date", "commit", "load_avg_1m"}
    assert harness.load_results("long-answers", path)["sft"]["speedup"] == 4.0


def test_old_single_machine_results_become_that_machines_entry(tmp_path):
    from benchmarks import harness

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine": {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "cores": 2,
                                            "date": "2026-11-23"}, "sft": {"speedup": 2.0}}))
    (entry,) = harness.load_history(path)["entries"].values()
    assert entry["sft"] == {"speedup": 2.0} and entry["date"] == "2026-11-23" and entry["workload"] == "default"
