"""tunepipe.prdiff without git: the per-item file's contents, and the markdown for the cases git cannot stage."""

from __future__ import annotations

from tunepipe import prdiff
from tunepipe.params import Compare

CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM.<|im_end|>\n<|im_start|>user\n"
          "What is 3 + 4?\nAnswer with only the number.<|im_end|>\n<|im_start|>assistant\n")
ALPACA = ("Below is an instruction that describes a task.\n\n### Instruction:\nSort these numbers.\n\n"
          "### Input:\n3, 1, 2\n\n### Response:\n")


def test_question_drops_the_template_and_system_prompt():
    assert prdiff.question(CHATML) == "What is 3 + 4? Answer with only the number."
    assert prdiff.question(ALPACA) == "Sort these numbers. 3, 1, 2"
    assert prdiff.question("plain " * 100, limit=20) == "plain plain plain p…"


def gen(i, task, output="x"):
    return {"model": "final", "id": f"t{i}", "prompt": CHATML, "reference": "7", "output": output, "task": task,
            "rougeL": 0.123456, "ref_nll": 0.5, "ref_tokens": 2, "n_new_tokens": 3}


def test_item_results_keep_only_what_a_diff_needs():
    pairs = [{"id": "p0", "correct": True, "chosen_logp": -5.0, "chosen_tokens": 5, "rejected_logp": -20.0,
              "rejected_tokens": 40, "margin": 15.0}]
    out = prdiff.item_results({"final": ([gen(0, "pass", "7" * 500)], pairs)})
    assert out["prompts"] == [{"id": "t0", "prompt": "What is 3 + 4? Answer with only the number.", "reference": "7"}]
    (g,) = out["models"]["final"]["generations"]
    assert g == {"id": "t0", "task": "pass", "output": "7" * 199 + "…", "rougeL": 0.1235, "ref_nll": 0.5,
                 "ref_tokens": 2}
    assert out["models"]["final"]["preferences"] == [{"id": "p0", "correct": True, "correct_norm": False}]


def items(passes: set, n=6) -> dict:
    return {"prompts": [{"id": f"t{i}", "prompt": f"q{i}"} for i in range(n)],
            "models": {"final": {"generations": [gen(i, "pass" if i in passes else "wrong_answer") for i in range(n)],
                                 "preferences": []}}}


def test_render_without_results_on_either_side():
    cfg = Compare()
    assert "_No per-item results at `abc1234`; significance not computed._" in \
        prdiff.render(None, items({1}), "abc1234", cfg)
    assert "_No per-item results in the workspace (metrics/eval_items.json); run `dvc repro compare`._" in \
        prdiff.render(items({1}), None, "abc1234", cfg)


def test_render_a_new_model_and_items_only_in_one_revision():
    old = items({0, 1}, n=4)
    new = items({0, 2, 5}, n=6)  # t4, t5 are new items: not paired, not flipped
    new["models"]["sft"] = new["models"]["final"]
    md = prdiff.render(old, new, "abc1234", Compare())
    assert "_sft: not in `abc1234`'s per-item results; nothing to compare._" in md
    row = next(line for line in md.splitlines() if line.startswith("| final | task accuracy"))
    assert row.split("|")[3:9] == [" 50.0% ", " 50.0% ", " +0.0 pts ", " p=1.00 ", " n.s. ", " 4 "]
    assert "#### final: 1 fail → pass, 1 pass → fail" in md
    assert "| t2 | q2 | ✗ wrong_answer: x | ✓: x |" in md and "| t5 |" not in md
