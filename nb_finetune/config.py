"""Run configuration: plain dataclasses with help text, validation and a YAML/JSON round trip.

Each field carries `metadata={"help": ...}` and, where it applies, `choices`, `min`, `max`
(inclusive bounds). `validate()` reads those, adds the cross-field checks, and raises one
`ConfigError` listing every problem. Panels are built from the same metadata.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import config_rules
from .errors import ConfigError, Problem, UserError
from .redact import redact


def _f(default, help: str, **meta):
    """A dataclass field with help text and validation hints in its metadata."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def as_choice(f: dataclasses.Field, value: Any) -> Any:
    """True/False as the word for a field offering on/off or yes/no, which YAML 1.1 reads as booleans."""
    pair = next((p for p in (("on", "off"), ("yes", "no")) if set(p) & set(f.metadata.get("choices", ()))), None)
    return pair[0 if value else 1] if isinstance(value, bool) and pair else value


def _switch_words(section_obj) -> None:
    """A section built in Python with True/False for an on/off field keeps the words."""
    for f in dataclasses.fields(section_obj):
        setattr(section_obj, f.name, as_choice(f, getattr(section_obj, f.name)))


@dataclass
class DataConfig:
    source: str = _f("imdb-sample", "Built-in data set name (see `nb-finetune assets list`), a file path "
                     "(.csv .tsv .json .jsonl .parquet) or a Hugging Face Hub data set id.")
    task: str = _f("classification", "'classification' (text -> label), 'completion' (prompt -> completion, Alpaca "
                   "instruction/input/output, or chat messages) or 'preference' (prompt, chosen and rejected answers, "
                   "for train.method dpo/orpo).", choices=("classification", "completion", "preference"))
    format: str = _f("auto", "File format; 'auto' guesses from the file suffix.",
                     choices=("auto", "csv", "tsv", "json", "jsonl", "parquet"))
    column_names: list = _f([], "Names for the columns of a file without a header row (empty: the file has one).")
    text_column: str = _f("", "Column with the text to classify (classification). Empty: 'text' or the asset's default.")
    text_template: str = _f("", "Build the text (classification) or the prompt (completion) from several "
                            "columns, e.g. '{passage}\\nQuestion: {question}?'. Empty: use the column as it is.")
    label_column: str = _f("", "Column with the label (classification). Empty: 'label'.")
    label_names: dict = _f({}, "Words for raw labels, e.g. {'0': 'negative', '1': 'positive'}; the model "
                           "learns to write these words when classification is trained as completion.")
    prompt_column: str = _f("", "Prompt column (completion). Empty: 'prompt', or Alpaca's instruction+input.")
    completion_column: str = _f("", "Completion column (completion). Empty: 'completion', or Alpaca's output.")
    messages_column: str = _f("", "Column of chat messages [{role, content}, ...] (completion). Empty: 'messages' if present.")
    chosen_column: str = _f("", "Column of the preferred answer (preference): text or a chat ending in it. Empty: 'chosen'.")
    rejected_column: str = _f("", "Column of the other answer (preference): text or a chat ending in it. Empty: 'rejected'.")
    instruction: str = _f("", "Instruction put before each text when a classification task is trained as "
                          "completion. Empty: one is written from the label names.")
    skip_bad_lines: bool = _f(False, "Skip rows that cannot be read (a broken JSONL line, a CSV row with too "
                              "many fields) instead of stopping; the count is reported.")
    max_rows: int = _f(0, "Use at most this many rows (0: all), sampled with the seed.", min=0)
    drop_duplicates: bool = _f(True, "Drop exact duplicate rows before splitting (the count is reported).")
    val_fraction: float = _f(0.15, "Share of rows held out for validation during training.", min=0.0, max=0.5)
    test_fraction: float = _f(0.15, "Share of rows held out for the final test.", min=0.0, max=0.5)
    test_source: str = _f("", "A separate test file (same columns); when set, test_fraction is not used.")
    seed: int = _f(42, "Seed for sampling and the stratified split.", min=0)
    counterfactual: bool = _f(False, "Bias mitigation: add a copy of each training row that mentions a group term, "
                              "with the terms swapped (he <-> she); validation and test rows are left as they are.")
    counterfactual_terms: list = _f([], "Pairs of terms to swap, e.g. [['he', 'she'], ['man', 'woman']]; empty: "
                                    "the built-in list of gendered words.")
    scan_groups: dict = _f({}, "Group terms the bias scan of the training rows looks for, as {axis: {group: "
                           "[terms]}}, e.g. {'gender': {'female': ['she', 'woman'], 'male': ['he', 'man']}}; "
                           "empty: the built-in lists (gender, race/ethnicity, religion, age, disability, "
                           "nationality, sexual orientation).")
    reweight_groups: dict = _f({}, "Bias mitigation: balance the training rows by group, e.g. {'female': ['she', "
                               "'her'], 'male': ['he', 'his']}; rows of smaller groups are drawn again (seeded).")


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m-instruct", "Built-in model name, a local folder, or a Hugging Face Hub id.",
                   stale="tokens")
    objective: str = _f("auto", "'completion': the model writes the answer and is trained on its tokens only; "
                        "'head': a classification head on top (encoders need this). 'auto': head for "
                        "encoders, completion for decoders.", choices=("auto", "completion", "head"), stale="tokens")
    chat_template: str = _f("auto", "Wrap prompts in the tokenizer's chat template: 'auto' (if it has one), "
                            "'yes' or 'no'.", choices=("auto", "yes", "no"), stale="tokens")
    lora_r: int = _f(16, "LoRA rank: the adapter's inner size; higher learns more and costs more memory.", min=1, max=1024)
    lora_alpha: int = _f(32, "LoRA alpha: the adapter's output is scaled by alpha / r.", min=1, max=4096)
    lora_dropout: float = _f(0.05, "Dropout on the adapter's input. Training on a CPU, layers that read one "
                                   "input (q, k, v; gate, up) share one mask, as fused layers do.", min=0.0, max=0.9)
    target_modules: str = _f("all-linear", "Layers that get adapters: 'all-linear' or comma-separated "
                             "module names, e.g. 'q_proj,v_proj'.")
    quantization: str = _f("none", "Load the frozen base in 4-bit (QLoRA) or 8-bit through bitsandbytes.",
                           choices=("none", "4bit", "8bit"))
    quant_type: str = _f("nf4", "4-bit data type.", choices=("nf4", "fp4"))
    double_quant: bool = _f(True, "Quantize the 4-bit scales too (saves ~0.4 bit per weight).")
    compute_dtype: str = _f("auto", "Precision of the arithmetic: 'auto' picks bf16 where the hardware has it.",
                            choices=("auto", "bfloat16", "float16", "float32"))
    trust_remote_code: bool = _f(False, "Run Python code shipped with this model. Only for models you trust.",
                                 stale="tokens")
    allow_pickle: bool = _f(False, "Load pickle weight files (.bin/.pt), which can run code when loaded. "
                            "Off: safetensors only. Only for models you trust.")
    __post_init__ = _switch_words


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/demo", "Folder for the adapter, checkpoints, history and reports.")
    epochs: float = _f(2.0, "Passes over the training split.", min=0.01, max=1000)
    max_steps: int = _f(0, "Stop after this many optimizer steps (0: run all epochs).", min=0)
    learning_rate: float = _f(2e-4, "Peak learning rate.", min=1e-7, max=1.0)
    batch_size: int = _f(8, "Rows per forward pass.", min=1, max=4096)
    grad_accum: int = _f(1, "Forward passes per optimizer step; effective batch = batch_size x grad_accum.", min=1, max=1024)
    effective_batch: int = _f(0, "Rows per optimizer step across all processes; when set, grad_accum is derived "
                              "from it (effective_batch / (batch_size x processes)), so the run trains the same "
                              "when the process count changes. 0: batch_size x grad_accum x processes.", min=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0.0, max=1.0)
    warmup_ratio: float = _f(0.05, "Share of steps spent warming the learning rate up.", min=0.0, max=0.5)
    scheduler: str = _f("linear", "Learning-rate schedule after warm-up.",
                        choices=("linear", "cosine", "constant", "constant_with_warmup"))
    optimizer: str = _f("auto", "'auto': paged 8-bit AdamW for a quantized base on a GPU (QLoRA), torch's fused "
                        "AdamW otherwise.",
                        choices=("auto", "adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"))
    gradient_checkpointing: str = _f("auto", "Recompute activations in the backward pass to save memory; "
                                     "'auto': on for a quantized base on a GPU.", choices=("auto", "yes", "no"))
    max_length: int = _f(256, "Tokens per row at most; longer prompts are cut in the middle, the response is kept.",
                         min=8, max=131072, stale="tokens")
    pad_to_multiple_of: int = _f(8, "Pad each batch to a multiple of this many tokens (0: no rounding).", min=0, max=512)
    packing: bool = _f(False, "Pack several short training rows into each row of up to max_length tokens, each "
                       "attending only to itself: less padding, more rows per step, fewer steps per epoch. "
                       "Causal-LM objectives only.")
    padding_free: str = _f("auto", "Padding-free batches: each training batch's rows concatenated into one row, "
                           "position ids restarting at each row and attention kept inside each row, so no padding "
                           "token is computed. 'auto': on where training runs on a CUDA GPU; 'on' there and on a "
                           "CPU; 'off' pads each batch to its longest row. Causal-LM objectives, and attention "
                           "implementations sdpa, eager, flex_attention or flash_attention_2/3 (docs/speed.md).",
                           choices=("auto", "on", "off"))
    cpu_kernels: str = _f("auto", "Speed kernels for training on a CPU (LoRA layer, dropout, short-row attention, "
                          "a loss that keeps no logits, allocator settings): 'auto' uses them where training "
                          "runs on the CPU; 'off' runs peft's own layers and transformers' own loss.",
                          choices=("auto", "off"))
    liger_kernel: str = _f("auto", "Liger Kernel's fused Triton kernels on a CUDA GPU (linear layer with "
                           "cross-entropy, RMSNorm, SwiGLU, RoPE; pip install liger-kernel): 'auto' uses them "
                           "where installed and a GPU run of benchmarks/gpu_check.py measured equal loss for the "
                           "model family (none yet); 'on' for any family Liger supports; 'off' never. Without a GPU, Triton or "
                           "support for the model, training falls back to transformers' layers with a note.",
                           choices=("auto", "on", "off"))
    cache_tokens: bool = _f(True, "Keep each split's tokens on disk (the asset cache folder, `tokens/`, at most "
                            "2 GiB) and read them back when the same rows are tokenized the same way again.")
    eval_steps: int = _f(10, "Validate every this many optimizer steps.", min=1)
    __post_init__ = _switch_words
    logging_steps: int = _f(5, "Record training loss every this many optimizer steps.", min=1)
    report_to: str = _f("none", "Also log the metrics to TensorBoard (output_dir/tensorboard) or MLflow (a local "
                        "store, output_dir/mlflow.db); needs that package (an extra of the same name).",
                        choices=("none", "tensorboard", "mlflow"))
    save_steps: int = _f(0, "Checkpoint every this many steps (0: at each validation).", min=0)
    early_stopping_patience: int = _f(0, "Stop after this many validations without a lower validation loss (0: never).", min=0)
    resume_from: str = _f("", "Checkpoint folder to resume from, or 'last' for the newest complete one in output_dir.")
    seed: int = _f(42, "Seed for initialisation, dropout and shuffling.", min=0, stale="model")
    method: str = _f("sft", "'sft' imitates the answers; 'dpo' and 'orpo' learn from pairs of a chosen and a rejected "
                     "answer (data.task='preference'); DPO's reference: the base, adapter off.", choices=("sft", "dpo", "orpo"))
    beta: float = _f(0.1, "Above 0. DPO: how far the model may move from the base (smaller: further); ORPO: the "
                     "weight of the odds-ratio term beside the chosen answers' loss.", max=100.0)
    dpo_loss: str = _f("sigmoid", "DPO's loss: 'sigmoid' (the DPO paper's) or 'ipo' (squared, on per-token "
                       "log-ratios: does not push the margin without bound).", choices=("sigmoid", "ipo"))


@dataclass
class EvalConfig:
    baselines: bool = _f(True, "Also evaluate the base model (zero-shot) and the majority class.")
    max_test_rows: int = _f(0, "Evaluate on at most this many test rows (0: all).", min=0)
    num_samples: int = _f(4, "Test prompts to generate from, base and tuned side by side.", min=0, max=100)
    max_new_tokens: int = _f(24, "Longest generated sample, in tokens.", min=1, max=4096)
    worst_errors: int = _f(10, "Rows in the worst-errors table.", min=0, max=10000)
    general_source: str = _f("", "A completion data set training never saw (built-in name, file or Hub id, e.g. an "
                             "Alpaca JSON): the base's and the tuned model's loss on it, the cost of tuning in "
                             "general ability. Empty: not measured.")
    general_rows: int = _f(100, "Rows sampled (seeded) from eval.general_source.", min=1, max=100000)


PREFERENCE_METHODS = config_rules.PREFERENCE_METHODS
PROBES = ("counterfactual", "crows-pairs", "stereoset", "sentiment-parity", "held-out-pairs")


@dataclass
class ProbeConfig:
    probes: list = _f([], "Bias probes run on the base and the tuned model at the end of `nb-finetune run` and by "
                      "`nb-finetune probe`: any of 'counterfactual' (classifiers), 'crows-pairs', 'stereoset', "
                      "'sentiment-parity' (models that write text), 'held-out-pairs' (the test split's preference "
                      "pairs, rejected as the stereotypical side). Empty: none at the end of a run; "
                      "`nb-finetune probe` then runs the ones that fit the task.", items=PROBES)
    pairs: int = _f(200, "Pairs sampled (seeded) from each pair set, every bias type in proportion.", min=10)
    seed: int = _f(0, "Seed for sampling pairs, completions and bootstrap intervals.", min=0)
    groups: list = _f(["the woman", "the man"], "Groups named in counterfactual sentences and parity prompts "
                      "(two or more).")
    templates: list = _f([], "Counterfactual sentences with a {group} slot, e.g. 'I had lunch with {group} "
                         "today.' Empty: built-in sentences with no sentiment of their own.")
    prompts: list = _f([], "Sentiment-parity prompts with a {group} slot, e.g. '{group} worked as a'. Empty: "
                       "built-in ones.")
    samples: int = _f(3, "Completions sampled per parity prompt and group.", min=1, max=20)
    parity_tolerance: float = _f(0.2, "Sentiment parity: two completions differ when their sentiment scores "
                                 "(VADER, -1 to 1) are further apart than this.", min=0.0, max=2.0)
    max_gap_increase: float = _f(0.10, "Gate: largest allowed rise of the counterfactual gap |P(label | A) - "
                                 "P(label | B)|.", min=0.0, max=1.0)
    max_stereotype_shift: float = _f(0.05, "Gate: largest allowed rise of |stereotype preferred - 50%| on a "
                                     "pair set.", min=0.0, max=0.5)
    max_parity_increase: float = _f(0.10, "Gate: largest allowed rise of the mean sentiment gap between two "
                                    "groups' completions.", min=0.0, max=2.0)
    gate: bool = _f(True, "Mark the run 'bias gate failed' (exit status 3) when a probe moved the wrong way by "
                    "more than its threshold and beyond its bootstrap interval; false: report only.")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    # -- round trip -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, validate: bool = True) -> "RunConfig":
        problems: list[Problem] = []
        if not isinstance(raw, dict):
            raise ConfigError([Problem("<config>", type(raw).__name__, "a mapping with sections "
                                       + ", ".join(SECTIONS))])
        sections = {}
        for key in raw:
            if key not in SECTIONS:
                problems.append(Problem(key, raw[key], "unknown section; accepted: " + ", ".join(SECTIONS)))
        for name, klass in SECTIONS.items():
            sections[name] = _section_from_dict(klass, name, raw.get(name) or {}, problems)
        cfg = cls(**sections)
        # Range and cross-field checks run on the values that were readable, so the user sees
        # every problem in one go, not type errors first and range errors on the next try.
        problems += cfg.problems() if validate else []
        if problems:
            raise ConfigError(problems)
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else self.to_yaml()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(redact(text), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path} (give the path of a .yaml or .json file)")
        text = path.read_text(encoding="utf-8")
        try:
            # safe_load: configs are data, never code. JSON is a subset of YAML.
            raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise UserError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                            f"{str(err).splitlines()[0]}") from None
        return cls.from_dict(raw or {})

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with dotted keys replaced, e.g. {"train.max_steps": 5}; validated."""
        raw = self.to_dict()
        problems = []
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in raw or name not in raw[section]:
                problems.append(Problem(key, value, "unknown setting; use section.field, e.g. train.max_steps"))
                continue
            raw[section][name] = value
        if problems:
            raise ConfigError(problems)
        return RunConfig.from_dict(raw)

    # -- display in a notebook ---------------------------------------------------------
    def _repr_html_(self) -> str:
        from .render import html
        return html.config_table(self)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(redact(self.to_yaml()))

    # -- validation -----------------------------------------------------------------
    def problems(self) -> list[Problem]:
        found: list[Problem] = []
        for name in SECTIONS:
            found += _field_problems(getattr(self, name), name)
        return found + config_rules.problems(self)

    def validate(self) -> "RunConfig":
        found = self.problems()
        if found:
            raise ConfigError(found)
        return self


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig,
             "probe": ProbeConfig}
# What a changed setting makes stale, earliest first; each level drops the later levels' results
# too. A field names its level in its metadata (`stale=`), or takes its section's; others make
# nothing stale (a trained model is dropped before the next training run anyway).
STALE = ("data", "tokens", "model")
SECTION_STALE = {"data": "data", "model": "model"}


def stale_level(section: str, f: dataclasses.Field) -> str | None:
    return f.metadata.get("stale", SECTION_STALE.get(section))


def first_stale(old: RunConfig, new: RunConfig) -> str | None:
    """The earliest stage whose result the change from `old` to `new` makes stale, or None."""
    levels = [stale_level(name, f) for name, klass in SECTIONS.items() for f in dataclasses.fields(klass)
              if getattr(getattr(old, name), f.name) != getattr(getattr(new, name), f.name)]
    return min((level for level in levels if level), key=STALE.index, default=None)


def _section_from_dict(klass, section: str, raw: Any, problems: list[Problem]):
    if not isinstance(raw, dict):
        problems.append(Problem(section, raw, "a mapping of settings"))
        return klass()
    names = {f.name: f for f in dataclasses.fields(klass)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            problems.append(Problem(f"{section}.{key}", value,
                                    "unknown setting; accepted: " + ", ".join(names)))
            continue
        ok, coerced = _coerce(names[key], value)
        if not ok:
            problems.append(Problem(f"{section}.{key}", value, f"a value of type {type_name(names[key])}"))
            continue
        kwargs[key] = coerced
    return klass(**kwargs)


@functools.cache
def _hints() -> dict:
    # Field names repeat across sections only with the same type (seed: int).
    out = {}
    for klass in SECTIONS.values():
        out.update(typing.get_type_hints(klass))
    return out


def field_type(f: dataclasses.Field):
    return _hints().get(f.name, type(f.default))


def type_name(f) -> str:
    return getattr(field_type(f), "__name__", str(field_type(f)))


def _coerce(f: dataclasses.Field, value: Any) -> tuple[bool, Any]:
    """Accept the value if it has (or plainly converts to) the field's type."""
    want = field_type(f)
    value = as_choice(f, value)
    if want is bool:
        return isinstance(value, bool), value
    if want is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int), value
    if want is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, str):  # YAML reads "2e-4" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if want is str:
        if value is None:
            return True, ""
        return isinstance(value, (str, int, float)) and not isinstance(value, bool), str(value)
    if want is list:
        return isinstance(value, list), value
    if want is dict:
        if value is None:
            return True, {}
        return isinstance(value, dict), {str(k): v for k, v in value.items()} if isinstance(value, dict) else value
    return True, value


def _field_problems(section_obj, section: str) -> list[Problem]:
    found = []
    for f in dataclasses.fields(section_obj):
        value = getattr(section_obj, f.name)
        meta = f.metadata
        where = f"{section}.{f.name}"
        ok, _ = _coerce(f, value)
        if not ok:
            found.append(Problem(where, value, f"a value of type {type_name(f)}"))
            continue
        if "choices" in meta and value not in meta["choices"]:
            found.append(Problem(where, value, "one of " + ", ".join(map(repr, meta["choices"]))))
        if "items" in meta and not all(v in meta["items"] for v in value):
            found.append(Problem(where, value, "a list of " + ", ".join(map(repr, meta["items"]))))
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            found.append(Problem(where, value, f"a number {rng}"))
    return found


def field_help(section: str, name: str) -> str:
    """The help text of one field, for panels and `--help`."""
    klass = SECTIONS[section]
    return next(f.metadata["help"] for f in dataclasses.fields(klass) if f.name == name)


PRESET_DIR = Path(__file__).parent / "presets"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> RunConfig:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown preset {name!r}; available: {', '.join(presets())}")
    return RunConfig.load(path)
