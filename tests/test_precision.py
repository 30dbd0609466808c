"""precision: auto is decided by a measurement (tunepipe.precision), cached per machine.

The probe itself is replaced in most tests (its timing depends on the machine and its
load); one test runs it for real at tiny shapes to check it returns well-formed figures.
"""

from __future__ import annotations

import json

import pytest

from tunepipe.cli import StageError


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """tunepipe.precision with its cache in tmp_path and ``measure`` replaced: set ``ratio`` (bf16 speed / fp32)."""
    import torch

    from tunepipe import precision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []

    def fake_measure(shapes, tokens=precision.PROBE_TOKENS):
        calls.append(shapes)
        return {"fp32_ms": 100.0, "bf16_ms": round(100.0 / probe.ratio, 3), "tokens": tokens}

    monkeypatch.setattr(precision, "measure", fake_measure)
    probe.calls, probe.module = calls, precision
    return probe


def test_bf16_where_the_probe_measures_it_clearly_faster(probe):
    probe.ratio = 4.2  # the AMD EPYC with AVX512-BF16
    choice = probe.module.choose("auto")
    assert choice["precision"] == "bf16" and choice["source"] == "probe" and choice["bf16_speedup"] == 4.2
    assert "4.20x fp32" in probe.module.describe(choice)


def test_fp32_where_bf16_is_slower_despite_the_flags(probe):
    probe.ratio = 0.59  # the Intel Xeon with AVX512-BF16, no AMX
    assert probe.module.choose("auto")["precision"] == "fp32"


def test_fp32_where_bf16_is_only_a_little_faster(probe):
    probe.ratio = 1.1  # under CLEARLY_FASTER: not worth bf16's rounding
    assert probe.module.choose("auto")["precision"] == "fp32"


def test_the_measurement_is_cached_per_machine_and_shapes(probe, tmp_path):
    probe.ratio = 3.0
    first = probe.module.choose("auto")
    probe.ratio = 0.5  # a second probe would now say fp32: the cache keeps the first decision
    again = probe.module.choose("auto")
    assert again["precision"] == first["precision"] == "bf16" and again["source"] == "cache"
    assert len(probe.calls) == 1
    cached = json.loads((tmp_path / "cache/tunepipe/precision.json").read_text())
    (key,) = cached
    assert "torch" in key and "d576" in key and cached[key]["bf16_speedup"] == 3.0

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "intermediate_size": 128}))
    assert probe.module.choose("auto", model)["precision"] == "fp32"  # other shapes: measured anew
    assert probe.calls[-1] == {"hidden": 64, "kv": 32, "intermediate": 128}


def test_explicit_precision_is_never_probed(probe):
    probe.ratio = 4.0
    assert probe.module.choose("fp32") == {"precision": "fp32", "source": "params"}
    assert probe.module.choose("bf16")["precision"] == "bf16"
    with pytest.raises(StageError, match="fp16 needs a CUDA GPU"):
        probe.module.choose("fp16")
    assert probe.calls == []


def test_resolve_precision_and_the_scoring_dtype_follow_the_probe(probe):
    from tunepipe.modeling import resolve_precision
    from tunepipe.precision import inference_dtype

    probe.ratio = 0.59
    assert resolve_precision("auto") == "fp32" and inference_dtype("auto") == "float32"
    assert inference_dtype("bfloat16") == "bfloat16"


def test_training_metrics_record_the_ratio(probe):
    from tunepipe.training import RUN_FIGURES, choose_precision

    probe.ratio = 2.5
    precision, record = choose_precision("auto", None)
    assert precision == "bf16"
    assert record == {"precision_source": "measured", "precision_bf16_speedup": 2.5}
    assert set(record) <= set(RUN_FIGURES)  # a machine figure: not in the model folder's record
    assert choose_precision("fp32", None)[1] == {"precision_source": "params", "precision_bf16_speedup": None}


def test_the_real_probe_is_quick_and_well_formed():
    from tunepipe.precision import measure

    timing = measure({"hidden": 64, "kv": 32, "intermediate": 128}, tokens=64, repeats=1)
    assert timing["fp32_ms"] > 0 and timing["bf16_ms"] > 0 and timing["tokens"] in (64, 8)
