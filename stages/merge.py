"""merge: fold the SFT and DPO adapters into full-precision base weights and save the final model.

    python -m stages.merge [--params params.yaml]

Reads   models/base, models/sft, models/dpo (with the training.json each training stage
        writes: its params, code, library versions and results), data/tokenized/{tokenizer,sft},
        data/raw/manifest.json;
        params: shared.base_model, shared.trust_remote_code, merge
Writes  models/final/: safetensors weights in merge.dtype, the tokenizer with its chat
        template, generation_config.json (EOS and pad ids) and a model card (README.md)

The base is always loaded unquantized, whatever the training method: merging into
dequantized 4-bit weights would bake their rounding error into the result. The
adapters are merged in training order, each checked on a few prompts: the logits
after merging it against those of the adapter applied unmerged to the model before
it (the model it was trained on); a difference above merge.check_atol stops the stage.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import yaml

from tunepipe.artifacts import atomic_path, read_json
from tunepipe.cli import StageError, run_stage
from tunepipe.modeling import (ADAPTER_CONFIG, check_safetensors, fit_embeddings, is_adapter_dir, load_model,
                               load_tokenizer, set_cpu_threads, skipped_reason)
from tunepipe.params import Params
from tunepipe.training import TRAINING_RECORD

log = logging.getLogger("tunepipe.merge")

BASE = Path("models/base")
STAGES = {"sft": Path("models/sft"), "dpo": Path("models/dpo")}
TOKENIZED = Path("data/tokenized")
MANIFEST = Path("data/raw/manifest.json")
OUT = Path("models/final")


def main(params: Params) -> None:
    cfg = params.merge
    trust = params.shared.trust_remote_code
    for needed in (BASE, *STAGES.values(), TOKENIZED / "tokenizer"):
        if not needed.exists():
            raise StageError(f"{needed}: missing; run the earlier stages first (dvc repro)")

    import torch

    set_cpu_threads()

    # ---- tokenizer
    tokenizer = load_tokenizer(TOKENIZED / "tokenizer", trust_remote_code=trust)

    # ---- model: full-precision start, then the adapters trained after it
    start, adapters = merge_plan(BASE, list(STAGES.values()))
    base = load_model(start, dtype="float32", trust_remote_code=trust)
    fit_embeddings(base, tokenizer)
    base.eval()

    # ---- merge and evaluate: merged weights must reproduce base + adapters
    inputs = check_inputs(TOKENIZED / "sft", cfg.check_prompts)
    merged, diff = merge_checked(base, adapters, inputs)
    log.info("merge check: max |logit difference| merged vs base+adapters = %.3g over %d prompts (atol %g)",
             diff, len(inputs), cfg.check_atol)
    if not diff <= cfg.check_atol:
        raise StageError(f"merged model differs from base + adapters by {diff:.3g} > merge.check_atol "
                         f"{cfg.check_atol}; the adapters do not match this base model")

    # ---- save
    merged = merged.to(getattr(torch, cfg.dtype))
    merged.config.dtype = cfg.dtype
    set_generation_ids(merged, tokenizer)
    card = model_card(params, diff, start, adapters)
    with atomic_path(OUT, is_dir=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    log.info("saved %s (%s)", OUT, cfg.dtype)


def merge_plan(base: Path, stage_dirs: list[Path]) -> tuple[Path, list[Path]]:
    """Where merging starts (the base, or the last fully fine-tuned stage) and the adapters after it."""
    start, adapters = base, []
    for d in stage_dirs:
        if skipped_reason(d):
            continue
        if is_adapter_dir(d):
            adapters.append(d)
        elif (d / "config.json").is_file():
            start, adapters = d, []
        else:
            raise StageError(f"{d}: neither a PEFT adapter nor a model folder")
    return start, adapters


def merge_checked(model, adapters: list[Path], inputs: list[list[int]]):
    """(``model`` with each adapter merged in turn, the largest |logit difference| of a merge).

    Each merge is compared with its adapter applied unmerged to the model before it: the model
    it was trained on (train-dpo trains on the base with the SFT adapter merged). All adapters
    active at once on the base would match only plain LoRA: DoRA divides by the norm of the
    weight it was trained on, which there would lack the earlier adapters.
    """
    from peft import PeftModel

    worst = 0.0
    for adapter in adapters:
        if not is_adapter_dir(adapter):
            raise StageError(f"{adapter}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        check_safetensors(adapter)
        unmerged = PeftModel.from_pretrained(model, adapter, is_trainable=False).eval()
        want = logits(unmerged, inputs)  # kept, not the model: merging changes its weights in place
        model = unmerged.merge_and_unload().eval()
        worst = max([worst] + [(a - b).abs().max().item() for a, b in zip(logits(model, inputs), want)])
    return model, worst


def logits(model, inputs: list[list[int]]) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits.float() for ids in inputs]


def check_inputs(sft_dir: Path, n: int) -> list[list[int]]:
    """The first ``n`` validation (else train) examples: real prompts in the chat format."""
    from datasets import load_from_disk

    data = load_from_disk(str(sft_dir), keep_in_memory=True)
    split = data["validation"] if "validation" in data else data["train"]
    return [row for row in split.select(range(min(n, len(split))))["input_ids"]]


def set_generation_ids(model, tokenizer) -> None:
    """EOS (keeping any extra stop ids the base declared) and a pad that is not the EOS."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    ids = [tokenizer.eos_token_id] + [e for e in eos if e != tokenizer.eos_token_id]
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------- model card


def model_card(params: Params, diff: float, start: Path, adapters: list[Path]) -> str:
    base = params.shared.base_model
    manifest = read_json(MANIFEST) if MANIFEST.is_file() else {}
    records = {name: read_json(path / TRAINING_RECORD) for name, path in STAGES.items()
               if (path / TRAINING_RECORD).is_file()}
    trained = {name: record["params"] for name, record in records.items()}
    sft, dpo = trained.get("sft", {}), trained.get("dpo", {})
    skipped = skipped_reason(STAGES["dpo"])
    algorithm = dpo.get("algorithm", "dpo")  # a training.json from before train_dpo.algorithm: DPO
    loss = f", loss {dpo.get('loss_type')}" if algorithm == "dpo" else ""
    dpo_text = (f"DPO skipped ({skipped})" if skipped else
                f"then {algorithm.upper()} ({dpo.get('method')}{loss}, beta {dpo.get('beta')})")
    lines = [
        "---",
        yaml.safe_dump({"base_model": base.name, "library_name": "transformers", "pipeline_tag": "text-generation",
                        "tags": ["tunepipe", "sft", *([] if skipped else [algorithm]), sft.get("method", "unknown")]},
                       sort_keys=False).strip(),
        "---",
        "",
        f"# {base.name.split('/')[-1]}, fine-tuned with tunepipe "
        f"({'SFT' if skipped else 'SFT + ' + algorithm.upper()})",
        "",
        f"- Base model: `{base.name}` (source: {base.source}"
        + (f", revision {base.revision}" if base.revision else "")
        + (f", package {base.package}" if base.source == "gguf_package" else "") + ")",
        f"- Training: SFT ({sft.get('method')}), {dpo_text}; adapters merged into "
        f"{'the full-precision base' if start == BASE else start} and saved in {params.merge.dtype}.",
        f"- Merge check: max |logit difference| merged vs base + adapters = {diff:.3g} "
        f"(limit {params.merge.check_atol}).",
        "",
        "## Data",
        "",
        *data_lines(manifest),
        "",
        "## Training metrics",
        "",
        "```json",
        json.dumps({name: rec.get("results", {}) for name, rec in records.items()}, indent=2, sort_keys=True),
        "```",
        "",
        "## Training parameters, code and libraries",
        "",
        "```yaml",
        yaml.safe_dump({**{f"train_{name}": {k: record[k] for k in ("params", "seed", "code", "versions")}
                           for name, record in records.items()},
                        "merge": params.merge.model_dump(mode="json")}, sort_keys=False).strip(),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("models/final")',
        'model = AutoModelForCausalLM.from_pretrained("models/final")',
        'prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],',
        "                                 add_generation_prompt=True, return_tensors='pt', return_dict=True)",
        "out = model.generate(**prompt, max_new_tokens=32)  # stops at the EOS in generation_config.json",
        "```",
        "",
    ]
    return scrub_secrets("\n".join(lines))


def data_lines(manifest: dict) -> list[str]:
    if not manifest:
        return ["(no data/raw/manifest.json)"]
    out = ["Sources:", "", "```yaml", yaml.safe_dump(manifest.get("sources", {}), sort_keys=True).strip(), "```", ""]
    hashes = sorted(file_hashes(manifest))
    if hashes:
        out += ["| file | sha256 |", "|---|---|", *[f"| {name} | `{sha}` |" for name, sha in hashes]]
    return out


def file_hashes(node, prefix: str = ""):
    """(name, sha256) pairs wherever the manifest records one, whatever its nesting."""
    if isinstance(node, dict):
        if isinstance(node.get("sha256"), str):
            yield prefix or "?", node["sha256"]
        for key, value in node.items():
            if isinstance(value, str) and key.endswith("sha256") and key != "sha256":
                yield (f"{prefix}/{key}" if prefix else key), value
            elif isinstance(value, (dict, list)):
                yield from file_hashes(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from file_hashes(value, f"{prefix}[{i}]")


SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY", re.IGNORECASE)


def scrub_secrets(text: str) -> str:
    """Replace the value of any secret-looking environment variable (HF_TOKEN, ...) found in ``text``."""
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 8 and value in text:
            log.warning("model card: removed the value of $%s", name)
            text = text.replace(value, "<redacted>")
    return text


if __name__ == "__main__":
    run_stage(__doc__, main)
