"""The export stage on a tiny Llama: GGUF (llama.cpp's converter), Ollama Modelfile, Hub folder,
the round trip through transformers' GGUF reader, and a push that never writes the token."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from tunepipe import export
from tunepipe.cli import StageError
from tunepipe.params import Params, load_params

pytestmark = pytest.mark.skipif(not (export.CONVERTER_DIR / "convert_hf_to_gguf.py").exists(),
                                reason="llama.cpp's converter is not extracted (make setup)")

SECRET = "hf_tunepipeTestTokenNeverWritten123"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    """models/final (the tiny Llama with a merge-style card), test prompts and final's evaluation."""
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
    write_jsonl(root / "data/eval/final/generations.jsonl", [
        {"id": f"t{i}", "family": "arithmetic", "prompt": "p", "reference": "5", "output": "5" if i else "6",
         "n_new_tokens": 2, "stopped_at_eos": True, "truncated": False, "task": "pass" if i else "wrong_answer",
         "failures": [], "rougeL": 1.0, "ref_logp": -1.0, "ref_tokens": 2} for i in range(6)])
    write_jsonl(root / "data/eval/final/preferences.jsonl", [
        {"id": f"p{i}", "chosen_logp": -1.0, "rejected_logp": -2.0 + i, "chosen_tokens": 2, "rejected_tokens": 2,
         "margin": 1.0 - i, "correct": i < 1, "rejected_kind": "wrong"} for i in range(3)])
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


def test_writes_the_gguf_the_modelfile_and_the_hub_folder(exported):
    root, metrics = exported
    out = root / "models/export"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "hub", "model-f16.gguf"]
    hub = {p.name for p in (out / "hub").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"} <= hub
    assert not any(p.suffix in {".bin", ".pt", ".gguf"} for p in (out / "hub").iterdir())
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


def test_hub_card_has_metadata_and_the_evaluation_with_intervals(exported):
    import yaml

    root, _ = exported
    card = (root / "models/export/hub/README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "tiny-llama-test" and meta["license"] == "apache-2.0"
    assert {"tunepipe", "sft", "dpo"} <= set(meta["tags"])
    assert "| task accuracy | 83.3% | [" in card and "| preference accuracy (summed log-prob) | 33.3% |" in card
    assert "3 of 3 test prompts" in card and "Training details." in card


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


def test_push_never_writes_the_token(exported, monkeypatch, caplog, capsys):
    root, _ = exported
    calls = []

    class FakeApi:
        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, kwargs))

    monkeypatch.setattr(export, "push_to_hub", _with_api(export.push_to_hub, FakeApi()))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    run_export(root, monkeypatch, push_to_hub="someone/tiny-export")
    assert [c[0] for c in calls] == ["create_repo", "upload_folder", "upload_file", "upload_file"]
    assert all(kwargs["token"] == SECRET for _, kwargs in calls)
    assert calls[1][1]["folder_path"].endswith("models/export/hub")
    for f in [*root.rglob("*")]:
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    out = capsys.readouterr()
    assert SECRET not in caplog.text + out.out + out.err


def test_push_without_token_fails_before_any_upload(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(StageError, match="HF_TOKEN is not in the environment"):
        export.push_to_hub("a/b", tmp_path, [], True, api=object())


def test_push_to_hub_param_is_validated(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("export:\n  push_to_hub: not a repo id\n")
    with pytest.raises(Exception, match="push_to_hub must be a Hub repo id"):
        load_params(p)


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


def _with_api(push, api):
    return lambda *args, **kwargs: push(*args, **kwargs, api=api)
