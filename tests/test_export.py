"""The export stage on a tiny Llama: GGUF (llama.cpp's converter), Ollama Modelfile and the round
trip through transformers' GGUF reader. (The Hub folder, its card and the push: tests/test_publish.py.)"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from tunepipe import export
from tunepipe.cli import StageError
from tunepipe.params import Params

pytestmark = pytest.mark.skipif(not (export.CONVERTER_DIR / "convert_hf_to_gguf.py").exists(),
                                reason="llama.cpp's converter is not extracted (make setup)")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    """models/final (the tiny Llama with a merge-style card) and the test prompts; no evaluation."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("export_project")
    final = root / "models" / "final"
    shutil.copytree(tiny_model_dir, final)
    (final / "README.md").write_text("---\nbase_model: tiny-llama-test\ntags:\n- tunepipe\n- sft\n- dpo\n---\n\n"
                                     "# tiny, fine-tuned\n\nTraining details.\n")
    tok = AutoTokenizer.from_pretrained(final)
    questions = ["What is 2 + 3?", "Reverse 'abc'.", "Name a colour."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    write_jsonl(root / "data/templated/sft_test.jsonl",
                [{"id": f"t{i}", "prompt": p, "completion": "5"} for i, p in enumerate(prompts)])
    return root


def run_export(root: Path, monkeypatch, **export_params) -> dict:
    from stages.export import main

    monkeypatch.chdir(root)
    defaults = Params().model_dump()
    defaults["export"].update(export_params)
    main(Params.model_validate(defaults))
    return json.loads((root / "metrics/export.json").read_text())


@pytest.fixture(scope="module")
def exported(project):
    mp = pytest.MonkeyPatch()
    try:
        yield project, run_export(project, mp)
    finally:
        mp.undo()


def test_writes_the_gguf_and_the_modelfile_without_reading_any_evaluation(exported):
    root, metrics = exported
    out = root / "models/export"
    assert not (root / "data/eval").exists()  # export reads no evaluation: the Hub card is publish's
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "generation_config.json", "model-f16.gguf"]
    assert (out / "generation_config.json").read_bytes() == (root / "models/final/generation_config.json").read_bytes()
    assert "hub" not in metrics
    assert metrics["gguf"]["type"] == "f16" and metrics["gguf"]["converter"]["llama_cpp_python"] == "0.3.36"
    assert metrics["gguf"]["chat_template_kept"] and metrics["modelfile"]["template"] == "chatml"


def test_gguf_metadata_carries_tokenizer_chat_template_and_stop_ids(exported):
    from transformers import AutoTokenizer

    root, _ = exported
    tok = AutoTokenizer.from_pretrained(root / "models/final")
    meta = export.gguf_metadata(root / "models/export/model-f16.gguf")
    assert meta["architecture"] == "llama" and meta["n_tokens"] == len(tok)
    assert meta["chat_template"] == tok.chat_template
    assert meta["eos"] == tok.eos_token_id


def test_round_trip_matches_greedy_tokens_and_logits(exported):
    _, metrics = exported
    rt = metrics["round_trip"]
    assert rt["prompts"] == 3 and rt["greedy_same"] == 3 and rt["tokenizer_same"]
    assert rt["max_logit_diff"] <= rt["atol"] == export.GGUF_TYPES["f16"]
    assert metrics["llama_cpp"] is None  # llama-cpp-python is an optional extra, not installed here


def test_modelfile_template_renders_as_the_chat_template(exported):
    from transformers import AutoTokenizer

    root, _ = exported
    tok = AutoTokenizer.from_pretrained(root / "models/final")
    text = (root / "models/export/Modelfile").read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0]
    assert "FROM ./model-f16.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert system.startswith("You are a helpful AI assistant named SmolLM")
    conversation = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                    {"role": "user", "content": "And 7 * 6?"}]
    expected = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert export.render_ollama(template, conversation, system) == expected
    with_system = [{"role": "system", "content": "Be terse."}, *conversation]
    assert export.render_ollama(template, with_system, system) == tok.apply_chat_template(
        with_system, tokenize=False, add_generation_prompt=True)


def test_llama3_template_translates_with_its_bos(smol_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    tok.chat_template = (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    family, system = export.chat_family(tok)
    assert family.name == "llama3" and system is None
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert export.chat_family(tok) == (None, None)
    assert "TEMPLATE" not in export.modelfile("m.gguf", None, None, ["</s>"]).replace("# no TEMPLATE", "")


def test_extra_stop_ids_go_into_the_gguf(tmp_path, tiny_model_dir):
    final = tmp_path / "final"
    shutil.copytree(tiny_model_dir, final)
    config = json.loads((final / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], 0]  # a second stop id, as Llama 3 has
    (final / "generation_config.json").write_text(json.dumps(config))
    converter = export.find_converter()
    raw, out = tmp_path / "raw.gguf", tmp_path / "out.gguf"
    export.convert(converter, final, raw, "q8_0")
    fixes, template = export.missing_metadata(export.gguf_metadata(raw), [2, 0], None)
    assert fixes == {"eot": 0} and template is None
    export.rewrite_metadata(converter, raw, out, special_ids=fixes, chat_template="{{ 'x' }}")
    meta = export.gguf_metadata(out)
    assert (meta["eos"], meta["eot"], meta["chat_template"]) == (2, 0, "{{ 'x' }}")


def test_round_trip_failure_names_the_difference(project, monkeypatch):
    # a tolerance no conversion meets: the stage fails naming the prompt and the difference
    with pytest.raises(StageError, match=r"round trip: prompt 1: the GGUF's logits differ from models/final by"):
        run_export(project, monkeypatch, gguf_type="q8_0", check_atol=1e-9)
    assert (project / "models/export/model-f16.gguf").exists()  # the earlier export is untouched


def test_missing_converter_says_how_to_fix(tmp_path):
    with pytest.raises(StageError, match=r"converter is missing .*run `make setup`"):
        export.find_converter(tmp_path)
    shutil.copytree(export.CONVERTER_DIR / "gguf-py", tmp_path / "gguf-py")
    shutil.copytree(export.CONVERTER_DIR / "conversion", tmp_path / "conversion")
    (tmp_path / "convert_hf_to_gguf.py").write_text("# changed\n")
    with pytest.raises(StageError, match="converter files differ"):
        export.find_converter(tmp_path)


def test_llama_cpp_generation_is_compared_when_installed(exported, monkeypatch):
    """A stand-in for llama-cpp-python that answers what models/final answers."""
    root, metrics = exported
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "models/final")
    answers = {}

    class Llama:
        def __init__(self, model_path, **kwargs):
            assert model_path.endswith(".gguf")

        def tokenize(self, text, add_bos, special):
            return tok(text.decode(), add_special_tokens=False)["input_ids"]

        def generate(self, ids, **kwargs):
            yield from answers[tuple(ids)]

    from tunepipe.generation import encode_prompts
    from tunepipe.modeling import load_model

    prompts = [json.loads(line)["prompt"] for line in (root / "data/templated/sft_test.jsonl").open()]
    model = load_model(root / "models/final")
    for ids in encode_prompts(tok, prompts):
        answers[tuple(ids)] = export.greedy(model, ids, 16, [tok.eos_token_id])
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=Llama))
    metrics = run_export(root, monkeypatch, llama_cpp="require")
    assert metrics["llama_cpp"]["greedy_same"] == 3
