"""Held-out task accuracy over training: the alignment stage's guard against reward hacking.

    log = StepLog(CHECKPOINTS / "heldout.jsonl", resumed_step)    # survives a kill like the checkpoints
    check = HeldOutCheck(rows, tokenizer, run, log, every=cfg.eval_steps, max_new_tokens=24)
    trainer.add_callback(check.callback())                        # step 0, every `every` steps, the last step
    log.publish("data/alignment/heldout.jsonl")                   # once the model is saved

At each evaluation the model answers the same validation prompts greedily; the task checker
scores the answers. The accuracy and the mean answer length go to DVCLive (eval/task_accuracy,
eval/answer_tokens) and every answer to heldout.jsonl, so the report can show accuracy against
the training reward and list the prompts that went from pass to fail.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from tunepipe.artifacts import write_jsonl

log = logging.getLogger("tunepipe.heldout")


class StepLog:
    """Rows tagged with a training step, appended to a file beside the checkpoints as they come.

    A run resumed at step N keeps the rows of steps before N only: later rows were
    written after the checkpoint it resumes from and are written again.
    """

    def __init__(self, path: str | Path, resumed_step: Optional[int]):
        self.path = Path(path)
        rows = self.rows() if resumed_step else []
        write_jsonl(self.path, [r for r in rows if r["step"] < resumed_step])

    def extend(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    def rows(self) -> list[dict]:
        """The rows written so far; a line torn by a kill mid-write is left out."""
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                log.warning("%s: left out a line cut short by an interrupted run", self.path)
        return rows

    def publish(self, target: str | Path) -> None:
        """Copy the finished log to its output path (atomically)."""
        write_jsonl(target, self.rows())


def checkable_rows(rows: list[dict], n: int) -> list[dict]:
    """The first ``n`` rows whose meta has a task check (all of them in the default data)."""
    from tunepipe.tasks import has_check

    return [r for r in rows if has_check(r.get("meta"))][:n]


class HeldOutCheck:
    """A TrainerCallback (built by ``callback()``) evaluating held-out task accuracy at step 0,
    every ``every`` steps and at the last step."""

    def __init__(self, rows: list[dict], tokenizer, run, steplog: StepLog, *, every: int, max_new_tokens: int,
                 batch_size: int = 32):
        self.rows, self.tokenizer, self.run, self.steplog = rows, tokenizer, run, steplog
        self.every, self.max_new_tokens, self.batch_size = every, max_new_tokens, batch_size
        self.done = {r["step"] for r in steplog.rows()}

    def callback(self):
        from transformers import TrainerCallback

        check = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                check.maybe_evaluate(model, state.global_step, state.is_world_process_zero)

            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % check.every == 0 or state.global_step >= state.max_steps:
                    check.maybe_evaluate(model, state.global_step, state.is_world_process_zero)

        return _Callback()

    def maybe_evaluate(self, model, step: int, main_process: bool) -> None:
        if not self.rows or step in self.done or not main_process:
            return
        accuracy, tokens = self.evaluate(model, step)
        self.done.add(step)
        self.run.log_metrics(step, {"eval/task_accuracy": accuracy, "eval/answer_tokens": tokens})
        log.info("step %d: held-out task accuracy %.1f%% over %d prompts, answers %.1f tokens", step,
                 100 * accuracy, len(self.rows), tokens)

    def evaluate(self, model, step: int) -> tuple[float, float]:
        from tunepipe.generation import Decoding, generate
        from tunepipe.tasks import check

        answers = generate(model, self.tokenizer, [r["prompt"] for r in self.rows],
                           Decoding(max_new_tokens=self.max_new_tokens), batch_size=self.batch_size,
                           desc=f"held-out check, step {step}")
        results = [check(r["meta"], a.text) or "pass" for r, a in zip(self.rows, answers)]
        self.steplog.extend([{"step": step, "id": r.get("id"), "instruction": r.get("instruction", r["prompt"]),
                              "answer": a.text, "tokens": a.n_new_tokens, "checker": result,
                              "reference": r.get("completion")}
                             for r, a, result in zip(self.rows, answers, results)])
        return (sum(x == "pass" for x in results) / len(results),
                sum(a.n_new_tokens for a in answers) / len(answers))

    def summary(self) -> dict:
        """What metrics/train_dpo.json records: accuracy at the first and the last evaluation
        (from the log, so a resumed run counts the evaluations before its kill)."""
        passed: dict[int, list[bool]] = {}
        for row in self.steplog.rows():
            passed.setdefault(row["step"], []).append(row["checker"] == "pass")
        steps = sorted(passed)
        accuracy = [round(sum(passed[s]) / len(passed[s]), 5) for s in steps]
        return {"heldout_prompts": len(self.rows), "heldout_task_accuracy_first": accuracy[0] if steps else None,
                "heldout_task_accuracy_last": accuracy[-1] if steps else None}
