"""publish: a folder ready for the Hugging Face Hub, with a model card (-> models/hub/); optionally uploaded.

    python -m stages.publish [--params params.yaml]
    HF_TOKEN=hf_... python -m stages.publish          # with publish.push_to_hub: <owner>/<name>

Reads   models/final (the weights, tokenizer, generation_config.json and merge's card),
        metrics/eval.json (compare's figures with their intervals, the baselines, the headline),
        metrics/export.json (the GGUF round trip), data/raw/manifest.json (Hub data set ids);
        models/export (the GGUF and Modelfile, uploaded beside the folder); params: publish
Writes  models/hub/ (replaced atomically): every file of models/final but its README.md (hard links
        where the file system allows, else copies) and README.md, the Hub model card: YAML metadata
        (base_model, datasets, license, tags), final's evaluation (and export's, when evaluate.models
        has it) with intervals, the trivial baselines, compare's headline, the round trip, merge's card.

The card is built from what compare and export wrote, never recomputed: this stage takes a
second, and nothing depends on it. With publish.push_to_hub set it uploads models/hub/, the GGUF
and the Modelfile to that Hub repo (publish.private: create it private); the token is read from
$HF_TOKEN only and is never logged or written (tunepipe/hub.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunepipe.artifacts import atomic_path, read_json
from tunepipe.cli import StageError, run_stage
from tunepipe.params import Params

log = logging.getLogger("tunepipe.publish")

FINAL = Path("models/final")
EXPORT = Path("models/export")
EVAL = Path("metrics/eval.json")
EXPORT_METRICS = Path("metrics/export.json")
MANIFEST = Path("data/raw/manifest.json")
OUT = Path("models/hub")


def main(params: Params) -> None:
    from tunepipe import hub

    cfg = params.publish
    for needed in (FINAL, EVAL, EXPORT_METRICS):
        if not needed.exists():
            raise StageError(f"{needed}: missing; run the earlier stages first (dvc repro)")
    evaluation, exported = read_json(EVAL), read_json(EXPORT_METRICS)
    merged = (FINAL / "README.md").read_text(encoding="utf-8") if (FINAL / "README.md").is_file() else ""
    manifest = read_json(MANIFEST) if MANIFEST.is_file() else {}
    with atomic_path(OUT, is_dir=True) as tmp:
        files = hub.copy_model_files(FINAL, tmp)
        card = hub.model_card(merged_card=merged, evaluation=evaluation, export=exported, manifest=manifest,
                              license=cfg.license)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    log.info("wrote %s: %s and README.md (the model card)", OUT, ", ".join(files))

    if cfg.push_to_hub:
        extra = [EXPORT / exported["gguf"]["file"], EXPORT / "Modelfile"]
        for f in extra:
            if not f.is_file():
                raise StageError(f"{f}: missing; run the export stage first (dvc repro export)")
        url = hub.push_to_hub(cfg.push_to_hub, OUT, extra, cfg.private)
        log.info("uploaded %s, %s to %s", OUT, ", ".join(f.name for f in extra), url)


if __name__ == "__main__":
    run_stage(__doc__, main)
