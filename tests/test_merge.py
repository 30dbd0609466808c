"""merge: the saved model equals base + both adapters, loads with plain transformers, stops at EOS."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.trainingdata import make_workdir, prompt_text, tiny_params
from tunepipe.cli import StageError

SECRET = "hf_notarealtoken0123456789"


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, tiny_model_dir, smol_tokenizer):
    """train-sft and train-dpo have run (2 steps each, a high learning rate so the adapters matter)."""
    root = make_workdir(tmp_path_factory.mktemp("merge"), tiny_model_dir, smol_tokenizer)
    params = tiny_params(train_sft={"max_steps": 2, "learning_rate": 0.05},
                         train_dpo={"max_steps": 2, "learning_rate": 0.05})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from stages import train_dpo, train_sft

        train_sft.main(params)
        train_dpo.main(params)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def workdir(trained_workdir, tmp_path, monkeypatch):
    work = shutil.copytree(trained_workdir, tmp_path / "work")
    monkeypatch.chdir(work)
    return work


def test_merged_model_equals_base_plus_adapters_and_loads_plainly(workdir, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages import merge

    # a token that leaked into the data manifest must not reach the model card
    monkeypatch.setenv("HF_TOKEN", SECRET)
    manifest = json.loads(Path("data/raw/manifest.json").read_text())
    manifest["sources"]["sft"]["url"] = f"https://user:{SECRET}@example.org/data.jsonl"
    Path("data/raw/manifest.json").write_text(json.dumps(manifest))

    merge.main(tiny_params())

    final = Path("models/final")
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(final)  # plain transformers, no peft
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("models/base"), "models/sft",
                                          adapter_name="sft")
    reference.load_adapter("models/dpo", adapter_name="dpo")
    reference.base_model.set_adapter(["sft", "dpo"], inference_mode=True)
    base = AutoModelForCausalLM.from_pretrained("models/base")
    ids = tok(prompt_text(tok, "What is 2 + 3?"), return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        got, want, before = model(ids).logits, reference(ids).logits, base(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert (got - before).abs().max() > 1e-3  # the adapters changed the model

    card = (final / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card and "ab" * 32 in card
    # what trained each adapter: its params, code and library versions (the stages' training.json)
    for section in ("train_sft:", "train_dpo:", "merge:", "learning_rate: 0.05", "trl:", "code:",
                    '"rewards_accuracies"'):
        assert section in card, section
    assert SECRET not in card


def test_generation_stops_at_the_saved_eos(workdir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    from stages import merge

    merge.main(tiny_params())
    config = json.loads(Path("models/final/generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained("models/final")
    assert config["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert config["pad_token_id"] == tok.pad_token_id != tok.eos_token_id

    class EosAtThirdToken(LogitsProcessor):
        """A random tiny model rarely says EOS on its own: make it, and check generate() then stops."""

        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - self.start == 2:
                scores[:] = -float("inf")
                scores[:, tok.eos_token_id] = 0
            return scores

    model = AutoModelForCausalLM.from_pretrained("models/final")
    ids = tok(prompt_text(tok, "Sort 3, 1, 2."), return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False,
                         logits_processor=LogitsProcessorList([EosAtThirdToken(ids.shape[1])]))
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id and len(new) == 3  # stopped right at the EOS, from generation_config


def test_merge_check_catches_a_mismatch(workdir, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    from stages import merge

    # the DPO adapter dropped instead of merged cannot reproduce base + SFT + DPO
    original, merges = BaseTuner.merge_and_unload, []

    def merge_sft_drop_dpo(self, *args, **kwargs):
        merges.append(self)
        return original(self, *args, **kwargs) if len(merges) == 1 else self.unload()

    monkeypatch.setattr(BaseTuner, "merge_and_unload", merge_sft_drop_dpo)
    with pytest.raises(StageError, match="differs from base \\+ adapters"):
        merge.main(tiny_params(merge={"check_atol": 1e-6}))
    assert not Path("models/final").exists()


def test_full_fine_tuning_chain(tmp_path, monkeypatch, tiny_model_dir, smol_tokenizer):
    """method: full saves whole models; DPO's reference is then a frozen copy of the SFT model."""
    import torch
    from safetensors.torch import load_file

    from stages import merge, train_dpo, train_sft

    make_workdir(tmp_path, tiny_model_dir, smol_tokenizer, n_sft=8, n_pref=4)
    monkeypatch.chdir(tmp_path)
    params = tiny_params(train_sft={"method": "full", "max_steps": 1, "learning_rate": 1e-3},
                         train_dpo={"method": "full", "max_steps": 1, "learning_rate": 1e-3,
                                    "precompute_ref_log_probs": False})
    train_sft.main(params)
    train_dpo.main(params)
    for stage in ("sft", "dpo"):
        assert (tmp_path / f"models/{stage}/config.json").is_file()
        assert not (tmp_path / f"models/{stage}/adapter_config.json").exists()
    base, sft = load_file("models/base/model.safetensors"), load_file("models/sft/model.safetensors")
    assert any(not torch.equal(base[k], sft[k]) for k in base)
    # step 1 is logged before the first update: policy == reference, so the reference is the SFT model
    rewards = json.loads(Path("metrics/train_dpo.json").read_text())
    assert abs(rewards["rewards_chosen"]) < 1e-4 and abs(rewards["rewards_rejected"]) < 1e-4

    assert merge.merge_plan(Path("models/base"), [Path("models/sft"), Path("models/dpo")]) == (Path("models/dpo"), [])
    merge.main(params)
    final, dpo = load_file("models/final/model.safetensors"), load_file("models/dpo/model.safetensors")
    assert all(torch.equal(final[k], dpo[k]) for k in dpo)
