"""export: the final model as people run it elsewhere (-> models/export/, metrics/export.json).

    python -m stages.export [--params params.yaml]

Reads   models/final, data/templated/sft_test.jsonl (the round-trip prompts); llama.cpp's
        converter from .venv/llama.cpp-<version>/ (`make setup`; pinned by a hash in tunepipe/export.py);
        params: export.gguf_type, check_prompts, check_new_tokens, check_atol, llama_cpp
Writes  models/export/ (replaced atomically):
          model-<type>.gguf       llama.cpp's convert_hf_to_gguf.py, export.gguf_type; tokenizer, chat
                                  template and every stop id in its metadata
          Modelfile               Ollama: FROM, TEMPLATE (the chat template translated), PARAMETER stop, SYSTEM
          generation_config.json  models/final's (its stop ids, for evaluate@export)
        metrics/export.json  the converter, the GGUF's metadata and the round trip's result

Round trip: the GGUF is read back with transformers' GGUF reader and compared with models/final
on the first export.check_prompts test prompts: the same tokenization, greedy answers (a
difference allowed only at a near tie) and next-token logits within the type's tolerance;
beyond it the stage fails, naming the prompt and the difference. With llama-cpp-python
installed (export.llama_cpp), a compiled llama.cpp generates too and is compared the same way.
No evaluation is read here, so an evaluation setting never reruns the conversion: the Hub
folder with its model card, and the upload, are the publish stage's (stages/publish.py).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from tunepipe.artifacts import atomic_path, read_jsonl, sha256_file, write_json
from tunepipe.cli import StageError, run_stage
from tunepipe.params import Params

log = logging.getLogger("tunepipe.export")

FINAL = Path("models/final")
TEST = Path("data/templated/sft_test.jsonl")
OUT = Path("models/export")
METRICS = Path("metrics/export.json")
DECIMALS = 4


def main(params: Params) -> None:
    from tunepipe import export
    from tunepipe.generation import encode_prompts
    from tunepipe.modeling import load_model, load_tokenizer, set_cpu_threads
    from tunepipe.tokenization import generation_eos_ids

    cfg = params.export
    for needed in (FINAL, TEST):
        if not needed.exists():
            raise StageError(f"{needed}: missing; run the earlier stages first (dvc repro)")
    converter = export.find_converter()
    atol = cfg.check_atol or export.GGUF_TYPES[cfg.gguf_type]
    gguf_name = f"model-{cfg.gguf_type}.gguf"
    set_cpu_threads()
    started = time.perf_counter()

    tokenizer = load_tokenizer(FINAL)
    stops = [tokenizer.eos_token_id, *sorted(generation_eos_ids(FINAL) - {tokenizer.eos_token_id})]

    with atomic_path(OUT, is_dir=True) as tmp:
        # ---------------------------------------------------------------- GGUF
        gguf = tmp / gguf_name
        raw = tmp / "converted.gguf"
        export.convert(converter, FINAL, raw, cfg.gguf_type)
        fixes, template = export.missing_metadata(export.gguf_metadata(raw), stops, tokenizer.chat_template)
        if fixes or template:
            log.info("adding to the GGUF's metadata: %s%s", fixes, " and the chat template" if template else "")
            export.rewrite_metadata(converter, raw, gguf, special_ids=fixes, chat_template=template)
            raw.unlink()
        else:
            raw.rename(gguf)
        meta = export.gguf_metadata(gguf)
        log.info("wrote %s (%.0f MB) in %.0f s", gguf_name, gguf.stat().st_size / 1e6, time.perf_counter() - started)

        # ---------------------------------------------------------------- round trip
        prompts = [row["prompt"] for row in read_jsonl(TEST)[:cfg.check_prompts]]
        ids = encode_prompts(tokenizer, prompts)
        reference = load_model(FINAL).eval()
        exported, gguf_tokenizer = export.load_gguf(gguf)
        gguf_ids = encode_prompts(gguf_tokenizer, prompts)
        if gguf_ids != ids:
            n = next(i for i, (a, b) in enumerate(zip(gguf_ids, ids), 1) if a != b)
            raise StageError(f"round trip: prompt {n}: the GGUF's tokenizer encodes it differently from "
                             f"models/final's ({len(gguf_ids[n - 1])} vs {len(ids[n - 1])} tokens)")
        results = [export.compare_prompt(reference, exported, i, cfg.check_new_tokens, stops, atol) for i in ids]
        export.check_result(results, atol, tokenizer.decode)
        llama_cpp = None
        if cfg.llama_cpp != "off":
            generated = export.llama_cpp_generate(gguf, ids, cfg.check_new_tokens, stops, prompts)
            if generated is None and cfg.llama_cpp == "require":
                raise StageError("export.llama_cpp is require but llama-cpp-python is not installed "
                                 "(pip install llama-cpp-python==0.3.36, or set export.llama_cpp: auto)")
            if generated is not None:
                llama_cpp = llama_cpp_results(export, reference, ids, generated, results, atol, tokenizer)
        del reference, exported

        # ---------------------------------------------------------------- Modelfile
        family, system = export.chat_family(tokenizer)
        if family is None:
            log.warning("the chat template is of no family tunepipe translates (%s): the Modelfile has no TEMPLATE",
                        ", ".join(f.name for f in export.CHAT_FAMILIES))
        stop_texts = [tokenizer.convert_ids_to_tokens(s) for s in stops]
        (tmp / "Modelfile").write_text(export.modelfile(gguf_name, family, system, stop_texts), encoding="utf-8")

        if (FINAL / "generation_config.json").is_file():  # evaluate@export's stop ids
            shutil.copy2(FINAL / "generation_config.json", tmp / "generation_config.json")

    # -------------------------------------------------------------------- record
    round_trip = {"prompts": len(results), "new_tokens": cfg.check_new_tokens, "atol": atol,
                  "greedy_same": sum(r["same_tokens"] for r in results), "tokenizer_same": True,
                  "max_logit_diff": round(max(r["max_logit_diff"] for r in results), DECIMALS),
                  "items": [{k: round(v, DECIMALS) if isinstance(v, float) else v for k, v in r.items()
                             if not k.endswith("_tokens")} for r in results]}
    write_json(METRICS, {
        "gguf": {"file": gguf_name, "type": cfg.gguf_type, "bytes": (OUT / gguf_name).stat().st_size,
                 "sha256": sha256_file(OUT / gguf_name),
                 "converter": {"llama_cpp_python": export.LLAMA_CPP_PYTHON, "sha256": converter.sha256},
                 "metadata": {k: v for k, v in meta.items() if k != "chat_template"},
                 "chat_template_kept": meta["chat_template"] == tokenizer.chat_template,
                 "metadata_added": fixes, "stop_ids": stops},
        "round_trip": round_trip,
        "llama_cpp": llama_cpp,
        "modelfile": {"template": family.name if family else None, "system": system is not None,
                      "stops": stop_texts},
    })
    log.info("export: %s, Modelfile (%s); round trip: %d/%d prompts with the same greedy tokens, "
             "max |logit difference| %.3g (tolerance %g); %.0f s", gguf_name, family.name if family else "no TEMPLATE",
             round_trip["greedy_same"], len(results), round_trip["max_logit_diff"], atol, time.perf_counter() - started)


def llama_cpp_results(export, reference, ids, generated, results, atol, tokenizer) -> dict:
    """The compiled llama.cpp's answers against models/final's, judged as the round trip is."""
    items = []
    for n, (prompt_ids, gen, ref) in enumerate(zip(ids, generated, results), 1):
        if not gen["tokenizer_matches"]:
            raise StageError(f"llama.cpp: prompt {n}: llama.cpp tokenizes it differently from models/final")
        ours = ref["reference_tokens"]
        first = next((i for i, (a, b) in enumerate(zip(ours, gen["tokens"])) if a != b), None)
        if first is not None:
            logits = export.next_token_logits(reference, prompt_ids + ours, len(ours))
            gap = float(logits[first, ours[first]] - logits[first, gen["tokens"][first]])
            if gap > atol:
                raise StageError(f"llama.cpp: prompt {n}: greedy answers differ at token {first}: models/final "
                                 f"{tokenizer.decode(ours[first:first + 1])!r}, llama.cpp "
                                 f"{tokenizer.decode(gen['tokens'][first:first + 1])!r} (not a near tie: {gap:.3g})")
        items.append({"same_tokens": first is None and len(ours) == len(gen["tokens"]), "first_difference": first})
    return {"greedy_same": sum(i["same_tokens"] for i in items), "prompts": len(items), "items": items}


if __name__ == "__main__":
    run_stage(__doc__, main)
