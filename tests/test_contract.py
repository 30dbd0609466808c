"""dvc.yaml tells the truth: each stage declares exactly what it reads.

Every stage of the tiny pipeline is run again as dvc.yaml runs it, under
tests/contract_probe.py, which records the params keys the stage touches and the
files and modules it reads. Then, per stage:

  * a params key read but not declared fails (DVC would not rerun the stage when it
    changes), except the training stages' bookkeeping keys, which retrain nothing;
  * a declared params key never read fails (DVC would rerun the stage for nothing);
  * a file or project module read but not declared fails. Declared files that one run
    does not read are allowed: a stage reads some only under some params (the accelerate
    config with several processes, a local data path with source: local).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dvcproject import copy_project
from tunepipe.params import BOOKKEEPING_KEYS

pytestmark = pytest.mark.e2e

PROBE = Path(__file__).with_name("contract_probe.py")
# Reading params, the command line, atomic writes and the environment check change no result.
INFRASTRUCTURE = {"params.yaml", "stages/__init__.py", "tunepipe/__init__.py", "tunepipe/params.py",
                  "tunepipe/cli.py", "tunepipe/artifacts.py", "tunepipe/environment.py"}
# Training checkpoints: resumed only under the same fingerprint, deliberately not DVC outputs.
NOT_OUTPUTS = ["models/checkpoints"]
UNDECLARED_KEYS = {f"{section}.{key}" for section in ("train_sft", "train_dpo", "train_reward")
                   for key in BOOKKEEPING_KEYS}
# Stages that do their work only under some params are probed under those (and the params put back after).
PROBE_PARAMS = {"train-reward": {"train_dpo": {"algorithm": "grpo", "reward": "model"}}}


def declared_stages(root: Path) -> list[dict]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [{"name": s.addressing.split(":")[-1], "cmd": s.cmd,
                 "deps": [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)],
                 "params": [p for d in s.deps if isinstance(d, ParamsDependency) for p in d.params],
                 "outs": [o.def_path for o in s.outs]} for s in repo.index.stages]


@pytest.fixture(scope="module")
def probed(reproduced_project, tmp_path_factory):
    """Each stage's declaration and what it read, from one run of each on a copy of the project."""
    root, env = copy_project(reproduced_project, tmp_path_factory.mktemp("contract") / "p")
    out = {}
    for stage in declared_stages(root):
        args = shlex.split(stage["cmd"])
        assert args[:2] == ["python", "-m"], stage["cmd"]
        result = root / f".probe-{stage['name']}.json"
        with probe_params(root, PROBE_PARAMS.get(stage["name"], {})):
            proc = subprocess.run([sys.executable, str(PROBE), str(result), *args[1:]], cwd=root, capture_output=True,
                                  text=True, timeout=900, env={**env, "PYTHONDONTWRITEBYTECODE": "1"})
        assert proc.returncode == 0, f"{stage['name']}:\n{proc.stderr[-3000:]}"
        read = json.loads(result.read_text())
        assert read["exit"] == 0, f"{stage['name']} exited {read['exit']}:\n{proc.stderr[-3000:]}"
        result.unlink()
        out[stage["name"]] = {**stage, "read_params": read["params"], "reads": read["reads"]}
    return out


@contextlib.contextmanager
def probe_params(root: Path, changes: dict):
    """params.yaml with ``changes`` ({section: {key: value}}) for one probe, then as it was."""
    path = root / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(original)


def covered(key: str, by: list[str], sep: str = ".") -> bool:
    """``key`` is one of ``by`` or inside one of them (params: sep ".", paths: sep "/")."""
    return any(key == d or key.startswith(d.rstrip(sep) + sep) for d in by)


def test_every_stage_was_probed(probed):
    assert {"fetch", "template", "tokenize", "train-sft", "train-reward", "train-dpo", "merge", "evaluate@base", "evaluate@sft",
            "evaluate@final", "compare", "report"} <= set(probed)


def test_every_params_key_a_stage_reads_is_declared(probed):
    problems = {name: [k for k in s["read_params"] if not covered(k, s["params"]) and k not in UNDECLARED_KEYS]
                for name, s in probed.items()}
    problems = {name: keys for name, keys in problems.items() if keys}
    assert not problems, json.dumps(problems, indent=1)


def test_every_declared_params_key_is_read(probed):
    def read(key, keys):  # the key itself, a key inside it, or a section it is in dumped whole
        return any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in keys)

    problems = {name: [d for d in s["params"] if not read(d, s["read_params"])] for name, s in probed.items()}
    problems = {name: keys for name, keys in problems.items() if keys}
    assert not problems, json.dumps(problems, indent=1)


def test_every_file_and_module_a_stage_reads_is_declared(probed):
    def undeclared(path: str, stage: dict) -> bool:
        if path in INFRASTRUCTURE or ".tmp-" in path or covered(path, [".dvc", ".git", *NOT_OUTPUTS], "/"):
            return False
        if covered(path, stage["outs"], "/"):
            return False  # its own outputs
        if any(d.startswith(path + "/") for d in stage["deps"] + stage["outs"]):
            return False  # listing a folder on the way to a declared path
        return not covered(path, stage["deps"], "/")

    problems = {name: [p for p in s["reads"] if undeclared(p, s)] for name, s in probed.items()}
    problems = {name: paths for name, paths in problems.items() if paths}
    assert not problems, json.dumps(problems, indent=1)


def test_the_probe_sees_reads_of_params_files_and_modules(probed):
    # the checks above are only as good as the probe: it must see what merge plainly reads
    merge = probed["merge"]
    assert "merge.check_atol" in merge["read_params"]
    assert "models/sft/adapter_config.json" in merge["reads"] and "tunepipe/modeling.py" in merge["reads"]
