"""The Hugging Face Hub: a folder ready to upload (models/final's files and a model card) and the upload.

    copy_model_files(Path("models/final"), folder)          # hard links where possible, else copies
    text = model_card(merged_card=..., evaluation=read_json("metrics/eval.json"),
                      export=read_json("metrics/export.json"), manifest=..., license="apache-2.0")
    push_to_hub("owner/name", folder, [gguf, modelfile], private=True)   # token from $HF_TOKEN only

The card's evaluation is what compare wrote (metrics/eval.json): each figure with its interval,
for final and, when evaluate.models has it, for the GGUF as shipped (export); the trivial
baselines' task accuracy; compare's headline sentence. Nothing is recomputed here.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence

from tunepipe.cli import StageError

# (label, key in metrics/eval.json, shown as a percentage)
CARD_METRICS = (("task accuracy", "task_accuracy", True), ("ROUGE-L", "rougeL", False),
                ("perplexity of the reference answers", "perplexity", False),
                ("preference accuracy (summed log-prob)", "pref_accuracy", True),
                ("preference accuracy (per token)", "pref_accuracy_norm", True),
                ("answers ending with EOS", "eos_rate", True))
CARD_MODELS = {"final": "final (safetensors)", "export": "export (the GGUF read back)"}
BASELINES = {"constant": "the answer that passes the most training items of its type",
             "random": "a random pick among the offered options"}


# --------------------------------------------------------------------------- the folder


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Every file of the model folder but its README.md (weights, config, tokenizer, generation
    config) into ``dst``: a hard link where the file system allows it (the weights are large),
    else a copy. Returns the names."""
    names = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name != "README.md":
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
            names.append(f.name)
    return names


# --------------------------------------------------------------------------- model card


def _cell(summary: dict, key: str, pct: bool) -> str:
    if key not in summary:
        return ""
    fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3g}")
    low, high = summary.get(key + "_ci_low"), summary.get(key + "_ci_high")
    return fmt(summary[key]) + (f" [{fmt(low)}, {fmt(high)}]" if low is not None and high is not None else "")


def eval_table(evaluation: dict) -> list[str]:
    """Markdown rows from metrics/eval.json: final's figures (and export's, when evaluated) with
    their intervals, then each trivial baseline's task accuracy."""
    models = [m for m in CARD_MODELS if isinstance(evaluation.get(m), dict)]
    if not models:
        return []
    out = ["| metric | " + " | ".join(CARD_MODELS[m] for m in models) + " |",
           "|---|" + "---|" * len(models)]
    for label, key, pct in CARD_METRICS:
        if any(key in evaluation[m] for m in models):
            out.append(f"| {label} | " + " | ".join(_cell(evaluation[m], key, pct) for m in models) + " |")
    for name in sorted(k[len("baseline_"):] for k in evaluation if k.startswith("baseline_")):
        summary = evaluation[f"baseline_{name}"]
        if "task_accuracy" in summary:
            what = BASELINES.get(name, name)
            out.append(f"| task accuracy of a trivial baseline: {name} ({what}) | "
                       + " | ".join([_cell(summary, "task_accuracy", True)] + [""] * (len(models) - 1)) + " |")
    return out


def round_trip_line(export: dict) -> str:
    """One sentence from metrics/export.json: how the GGUF answered against models/final."""
    rt, gguf = export["round_trip"], export["gguf"]["file"]
    line = (f"{gguf} read back by transformers answered the same greedy tokens as the safetensors weights on "
            f"{rt['greedy_same']} of {rt['prompts']} test prompts (max |logit difference| "
            f"{rt['max_logit_diff']:.3g}, tolerance {rt['atol']:g}).")
    llama = export.get("llama_cpp")
    if llama:
        line += f" A compiled llama.cpp answered the same on {llama['greedy_same']} of {llama['prompts']}."
    return line


def split_title(body: str) -> tuple[Optional[str], str]:
    """A card body's first H1 (its title) and the body without it; every other heading outside
    code blocks one level down, so the Hub card has a single H1."""
    title, lines, fenced = None, [], False
    for line in body.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"# \S", line):
            if title is None:
                title = line[2:].strip()
                continue
            line = "#" + line
        lines.append(line)
    return title, "\n".join(lines).strip()


def strip_front_matter(card: str) -> str:
    """A model card's text without its YAML header."""
    match = re.match(r"^---\n.*?\n---\n", card, re.DOTALL)
    return card[match.end():] if match else card


def hub_datasets(manifest: dict) -> list[str]:
    """Hub data set ids the training data came from (none for generated or local data)."""
    ids = []
    for role in ("sft", "preference"):
        source = (manifest.get(role) or {}).get("source") or {}
        if source.get("source") == "hub" and source.get("id"):
            ids.append(source["id"])
    return sorted(set(ids))


def model_card(*, merged_card: str, evaluation: dict, export: dict, manifest: dict, license: Optional[str]) -> str:
    """The Hub model card: YAML metadata (base_model, datasets, license, tags), one H1 (merge's
    title), the evaluation from metrics/eval.json, the GGUF round trip, how to run it, then the
    rest of merge's card."""
    import yaml

    front = yaml.safe_load(merged_card.split("---")[1]) if merged_card.startswith("---") else {}
    front = front if isinstance(front, dict) else {}
    base = front.get("base_model") or "unknown"
    title, body = split_title(strip_front_matter(merged_card))
    meta = {"base_model": base, "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": list(dict.fromkeys([*(front.get("tags") or []), "gguf"]))}
    datasets = hub_datasets(manifest)
    if datasets:
        meta["datasets"] = datasets
    if license:
        meta["license"] = license
    confidence = (evaluation.get("settings") or {}).get("confidence", 0.95)
    table = eval_table(evaluation)
    headline = (evaluation.get("headline") or {}).get("text")
    gguf = export["gguf"]["file"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {title or base.split('/')[-1] + ', fine-tuned with tunepipe'}", "", "## Evaluation", ""]
    if table:
        lines += [f"On the held-out test split, each figure with its {round(100 * confidence)}% interval "
                  "(tunepipe's compare stage):", "", *table, ""]
    else:
        lines += ["No evaluation of final in metrics/eval.json.", ""]
    if headline:
        lines += [f"Headline: {headline}", ""]
    lines += [f"GGUF export: {round_trip_line(export)}", "",
              "## Run it elsewhere", "", "```bash",
              "ollama create my-model -f Modelfile        # with the GGUF and Modelfile from tunepipe's models/export/",
              f"llama-cli -m {gguf} -cnv               # llama.cpp: the chat template is in the GGUF",
              "```", "", body, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the upload


def push_to_hub(repo_id: str, folder: Path, extra_files: Sequence[Path], private: bool, api=None) -> str:
    """Upload the Hub folder and the GGUF/Modelfile; the token comes only from $HF_TOKEN.

    The token is handed to the client in memory: never logged, written or put in a URL."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise StageError("publish.push_to_hub is set but HF_TOKEN is not in the environment "
                         "(export HF_TOKEN=hf_... with write access; it is never written anywhere)")
    if api is None:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            raise StageError("publish.push_to_hub: the Hub is switched off here (HF_HUB_OFFLINE=1); unset it")
        api = HfApi()
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                          commit_message="tunepipe publish")
        for f in extra_files:
            api.upload_file(repo_id=repo_id, path_or_fileobj=str(f), path_in_repo=f.name, token=token,
                            commit_message=f"tunepipe publish: {f.name}")
    except StageError:
        raise
    except Exception as exc:  # the message may quote the request; keep the token out of it
        raise StageError(f"publish.push_to_hub {repo_id}: upload failed: {str(exc).replace(token, '<HF_TOKEN>')}") \
            from None
    return f"https://huggingface.co/{repo_id}"
