"""The whole tiny pipeline, twice, with a Hub token in the environment.

Same params on CPU -> the same metrics files (only wall-clock and memory figures
differ). The token (a distinctive fake) must never reach an output file, a
metrics file, the model card, the report or the logs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from pathlib import Path

import pytest
import yaml

from tests.dvcproject import tiny_params

pytestmark = pytest.mark.e2e

FAKE_TOKEN = "hf_FAKEtunepipeFaultSuite0123456789abcdef"
STAGES = [("fetch", {}), ("template", {}), ("tokenize", {}), ("train_sft", {}), ("train_dpo", {}), ("merge", {}),
          *[("evaluate", {"model": m}) for m in ("base", "sft", "final")], ("compare", {}), ("forgetting", {}),
          ("report", {})]
# measurements of the machine, not results of the run
MACHINE_KEYS = re.compile(r"seconds|per_second|rss|_mib$|duration|time")


def run_pipeline(root: Path, base: Path) -> str:
    """Every stage's main() in order inside ``root`` (as dvc.yaml runs them); returns everything logged."""
    import importlib

    from tunepipe.params import load_params

    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(str(base)), sort_keys=False))
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger()
    old_level, cwd = logger.level, os.getcwd()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    os.chdir(root)
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(captured), \
                contextlib.redirect_stderr(captured):
            mp.setenv("HF_TOKEN", FAKE_TOKEN)
            mp.setenv("HUGGING_FACE_HUB_TOKEN", FAKE_TOKEN)
            params = load_params("params.yaml")
            for name, options in STAGES:
                importlib.import_module(f"stages.{name}").main(params, **options)
    finally:
        os.chdir(cwd)
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return captured.getvalue()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("determinism")
    logs = [run_pipeline(root / f"run{i}", tiny_model_dir) for i in (1, 2)]
    return [root / "run1", root / "run2"], logs


def results(value):
    """A metrics value without the machine-dependent figures."""
    if isinstance(value, dict):
        return {k: results(v) for k, v in value.items() if not MACHINE_KEYS.search(k)}
    if isinstance(value, list):
        return [results(v) for v in value]
    return value


def metrics_files(run: Path) -> dict[str, object]:
    files = {}
    for path in sorted((run / "metrics").rglob("*")):
        rel = path.relative_to(run).as_posix()
        if path.suffix == ".json":
            files[rel] = results(json.loads(path.read_text()))
        elif path.suffix == ".tsv" and not MACHINE_KEYS.search(path.stem):
            files[rel] = path.read_text()
    return files


def test_same_params_give_identical_metrics(two_runs):
    (first, second), _ = two_runs
    a, b = metrics_files(first), metrics_files(second)
    assert {"metrics/tokenize.json", "metrics/train_sft.json", "metrics/train_dpo.json", "metrics/eval.json",
            "metrics/eval_items.json", "metrics/forgetting.json"} <= set(a)
    assert any(name.endswith("loss.tsv") for name in a)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    # and the artefacts behind them
    from tunepipe.artifacts import sha256_tree

    for out in ("data/raw", "data/tokenized", "models/sft", "models/dpo", "data/eval", "data/forgetting"):
        assert sha256_tree(first / out) == sha256_tree(second / out), out


def test_the_hub_token_is_never_written_or_logged(two_runs):
    runs, logs = two_runs
    assert (runs[0] / "models/final/README.md").is_file() and list((runs[0] / "reports").iterdir())
    assert all("tunepipe" in log for log in logs)  # the logs were really captured
    token = FAKE_TOKEN.encode()
    for run in runs:
        leaked = [p for p in run.rglob("*") if p.is_file() and token in p.read_bytes()]
        assert leaked == []
    for log in logs:
        assert FAKE_TOKEN not in log and FAKE_TOKEN[:12] not in log
