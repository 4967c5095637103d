"""The whole job, stage by stage: data -> tokens -> model -> training -> evaluation -> files.

`Session` is the job as a recipe: `setup` readies every stage that comes before the model
(trackers, data, general set, tokens, probes), each saying in one line what would stop the run;
then `load_model`, `train`, `evaluate`, `probe_bias` and `write_outputs`. Each stage keeps its
result, so a panel can run stages one at a time and show each; `run()` does them all, as the
command line does. The stages' rules live in their packages; the Session keeps the order.

Stage messages go to the sink the caller names for its work (`reporting_to`), on its own
thread: a panel clicked while another panel's training runs on a thread gets its own
messages, and the training its own.
"""
from __future__ import annotations

import contextvars
import dataclasses
import threading
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from . import assets, distributed, evaluation, hardware, kernels, memory, modeling, training
from . import data as data_mod
from .config import RunConfig, first_stale
from .data.collator import CompletionOnlyCollator, PairCollator
from .data.formatter import Formatter
from .data.report import add_token_checks
from .data.tokens import PACKING_NEEDS_CAUSAL_LM, pack, tokenize_frame, tokenize_pairs
from .errors import UserError
from .probes import gate, likelihood, runner
from .probes.pairs import PairSet
from .runs import report as run_files
from .runs.record import RunRecord, data_fingerprint, ending_on_failure, new_folder, training_summary
from .training import trackers
from .training.policy import PADDING_FREE_NEEDS_CAUSAL_LM

# The progress sink of the work running in this context (each thread has its own).
_SINK: contextvars.ContextVar = contextvars.ContextVar("nb_finetune_progress", default=None)


@contextmanager
def reporting_to(progress):
    """Stage messages of the session work inside, on this thread, go to `progress`."""
    token = _SINK.set(progress)
    try:
        yield
    finally:
        _SINK.reset(token)


class Session:
    def __init__(self, cfg: RunConfig, progress=print):
        self.cfg = cfg.validate()
        self.progress = progress  # the sink for work that names none
        self.prep = self.tokenizer = self.formatter = self.model = self.source = self.general_rows = None
        self.objective = None
        self.datasets: dict = {}
        self.token_stats: dict = {}
        self.train_result: training.TrainResult | None = None
        self.memory_estimate: memory.MemoryEstimate | None = None
        self.peak_memory: int | None = None
        self.eval_result: evaluation.EvalResult | None = None
        self.gate_result: gate.GateResult | None = None
        self.record: RunRecord | None = None  # run.json in output_dir, from the start of training
        self.trackers_checked: str | None = None  # the train.report_to whose packages were found
        self.base_results = evaluation.BaseResults()  # the base model's results, shared with the panels

    def reconfigure(self, cfg: RunConfig, source_changed: bool = False) -> None:
        """Take new settings and drop only the results they make stale, so a panel can re-run
        one stage without redoing the others. What each field makes stale (the data, the tokens,
        the model) is declared in its metadata (config.first_stale); a trained model is dropped
        before the next training run by `discard_training`."""
        cfg = cfg.validate()
        stale = "data" if source_changed else first_stale(self.cfg, cfg)
        self.cfg = cfg
        if stale == "data":
            self.prep = None
        if stale in ("data", "tokens") or self.prep is None:
            self.tokenizer = self.formatter = self.objective = None
            self.datasets, self.token_stats = {}, {}
        if stale is not None or self.formatter is None:
            self.discard_training()

    def discard_training(self) -> None:
        """Forget the model and what was trained with it; the next stage loads a fresh base."""
        self.model = self.train_result = self.eval_result = self.memory_estimate = self.gate_result = None

    def stages(self) -> list[tuple[str, bool]]:
        """Each stage of the job and whether the session has its result."""
        return [("data", self.prep is not None), ("tokens", bool(self.token_stats)),
                ("model", self.model is not None), ("training", self.train_result is not None),
                ("evaluation", self.eval_result is not None)]

    def _repr_html_(self) -> str:
        from .render import html
        if self.eval_result is not None:
            latest = html.evaluation(self.eval_result)
        elif self.train_result is not None:
            latest = html.history(self.train_result.history, training.diagnose(self.train_result.history))
        else:
            latest = html.data_report(self.prep.report) if self.prep is not None else ""
        return html.session(f"{self.cfg.model.name} on {self.cfg.data.source}", self.stages(), latest)

    def _repr_pretty_(self, p, cycle) -> None:
        done = [name for name, ok in self.stages() if ok]
        p.text(f"Session({self.cfg.model.name} on {self.cfg.data.source}; done: {', '.join(done) or 'nothing yet'})")

    @property
    def progress(self):
        """Where stage messages go: the sink of the work calling (`reporting_to`), else the
        session's own."""
        return _SINK.get() or self.own_progress

    @progress.setter
    def progress(self, sink) -> None:
        self.own_progress = sink

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def base_identity(self) -> tuple:
        """The settings the base model's outputs depend on: every model setting but the adapter's."""
        adapter = {"lora_r", "lora_alpha", "lora_dropout", "target_modules"}
        return tuple((f.name, getattr(self.cfg.model, f.name)) for f in dataclasses.fields(self.cfg.model)
                     if f.name not in adapter)

    @property
    def precision(self) -> str:
        return hardware.compute_dtype(self.cfg.model.compute_dtype)

    # -- setting up: the stages before training --------------------------------------------
    def setup(self, source=None) -> Session:
        """Every stage before the model, in order; each says in one line what would stop the run
        before the model costs time to load."""
        self.check_trackers()
        self.prepare_data(source)
        self.general_set()  # a general set that cannot be read stops the run before training
        self.tokenize()
        if self.cfg.probe.probes:
            self.check_probes()
        return self

    def check_trackers(self) -> None:
        """A tracker whose package is absent, said before any model loads; once per setting."""
        if self.trackers_checked != self.cfg.train.report_to:
            trackers.check(self.cfg.train)
            self.trackers_checked = self.cfg.train.report_to

    def prepare_data(self, source=None) -> data_mod.PreparedData:
        """`source` (a DataFrame or Dataset) replaces cfg.data.source and is kept for re-runs."""
        if source is not None:
            self.source = source
        source = self.source
        self.progress(f"loading data: {self.cfg.data.source if source is None else type(source).__name__}")
        self.prep = data_mod.prepare(self.cfg.data, source)
        return self.prep

    def general_set(self) -> pd.DataFrame | None:
        """eval.general_source's sampled rows, kept while those settings stand; None when unset."""
        e = self.cfg.eval
        key = (e.general_source, e.general_rows, self.cfg.data.seed)
        if not e.general_source:
            return None
        if self.general_rows is None or self.general_rows[0] != key:
            self.general_rows = (key, data_mod.completion_sample(*key))
        return self.general_rows[1]

    def tokenize(self) -> dict:
        if self.prep is None:
            self.prepare_data()
        m, t = self.cfg.model, self.cfg.train
        self.progress(f"loading tokenizer: {m.name}")
        self.tokenizer = modeling.load_tokenizer(m, self.progress)
        model_config = modeling.load_config(m, self.progress)
        self.objective = modeling.objective_for(m, model_config)
        refuse_unfit(self.cfg, self.objective, self.prep.task, getattr(model_config, "max_position_embeddings", None))
        self.formatter = Formatter.build(self.tokenizer, self.prep.task, self.prep.labels, t.max_length,
                                         m.chat_template, self.prep.config.instruction)
        self.tokenize_splits()
        add_token_checks(self.prep.report, self.token_stats, t.max_length)
        if len(self.datasets["train"]) == 0:
            raise UserError(f"no training row keeps a trained token at max_length {t.max_length}; "
                            "raise train.max_length")
        return self.token_stats

    def tokenize_splits(self) -> None:
        """The training and validation rows as token ids, through the token cache when it is on."""
        head_labels = {lab: i for i, lab in enumerate(self.prep.labels)} if self.objective == "head" else None
        cache = assets.cache_dir() / "tokens" if self.cfg.train.cache_tokens else None
        for name in ("train", "validation"):
            def said(message, name=name):
                self.progress(f"{name}: {message}")
            rows = self.prep.splits[name]
            self.datasets[name], self.token_stats[name] = (
                tokenize_pairs(rows, self.formatter, cache, said) if self.prep.task == "preference" else
                tokenize_frame(rows, self.formatter, head_labels, cache, said))

    def load_model(self):
        if self.formatter is None:
            self.tokenize()
        import transformers
        transformers.set_seed(self.cfg.train.seed)  # LoRA's initialisation draws random numbers too
        stats = self.token_stats["train"]
        self.memory_estimate = memory.estimate(self.cfg, self.objective, len(self.prep.labels),
                                               stats.trained_tokens / max(stats.tokens, 1))
        self.progress(self.memory_estimate.summary())
        memory.reset_peak()
        policy = hardware.precision(self.cfg.model.compute_dtype)
        if self.cfg.model.compute_dtype != "auto" and policy.dtype != self.cfg.model.compute_dtype:
            self.progress(f"compute_dtype {self.cfg.model.compute_dtype}: {policy.reason}; computing in {policy.dtype}")
        if policy.loss_scaling:
            self.progress("fp16 mixed precision: the loss is scaled so that small gradients do not underflow")
        self.progress(f"loading model: {self.cfg.model.name} ({self.objective}, {self.precision})")
        base = modeling.load_base(self.cfg.model, self.objective, self.prep.labels, self.tokenizer.pad_token_id,
                                  self.progress)
        self.model = modeling.add_lora(base, self.cfg.model, self.objective)
        return self.model

    @property
    def collator(self) -> CompletionOnlyCollator:
        klass = PairCollator if self.prep is not None and self.prep.task == "preference" else CompletionOnlyCollator
        return klass(self.tokenizer.pad_token_id, self.cfg.train.pad_to_multiple_of or None)

    # -- training, evaluation, probes ---------------------------------------------------
    def train(self, callbacks=(), stop: threading.Event | None = None) -> training.TrainResult:
        self.check_trackers()
        if self.model is None:
            self.load_model()
        self.use_new_folder()
        rows = self.training_rows()
        if distributed.is_main():
            callbacks = [*callbacks, self.start_record()]
        with ending_on_failure(self.record):
            target = training.TrainTarget(self.model, rows, self.datasets["validation"], self.collator,
                                          self.tokenizer, self.precision, self.cfg.model.quantization != "none")
            watch = training.Watch(callbacks, stop, self.training_info(len(rows)), self.progress)
            self.train_result = training.train(target, self.cfg.train, watch)
        self.end_training()
        return self.train_result

    def training_rows(self):
        """The tokenized training rows, packed into rows of up to max_length with train.packing."""
        rows, t = self.datasets["train"], self.cfg.train
        if not t.packing:
            return rows
        packed = pack(rows, t.max_length)
        self.progress(f"packing: {len(rows):,} rows into {len(packed):,} rows of at most {t.max_length} tokens")
        return packed

    def training_info(self, rows: int) -> dict:
        """What the panels show as training begins: rows, batches, processes and parameters."""
        t = self.cfg.train
        trainable, total = modeling.trainable_parameters(self.model)
        accum, processes = training.accumulation(t), distributed.world_size()
        return {"train_rows": rows, "effective_batch": t.batch_size * accum * processes, "batch_size": t.batch_size,
                "processes": processes, "grad_accum": accum, "trainable": trainable, "total": total,
                "precision": self.precision}

    def start_record(self) -> RunRecord:
        """The run's folder, its config and its run.json, written before the first step."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.save(self.output_dir / "config.yaml")
        self.record = RunRecord.start(self.output_dir, self.cfg.to_dict(),
                                      data_fingerprint(self.cfg.data.source, self.prep.splits),
                                      resuming=bool(self.cfg.train.resume_from))
        return self.record

    def end_training(self) -> None:
        """How training ended, into the record; the padding and the measured peak, said."""
        result = self.train_result
        if self.record is not None:
            self.record.end("stopped" if result.stopped else "finished", training=training_summary(result.history))
        self.progress(result.padding.summary())
        self.peak_memory = memory.measured_peak()
        if self.memory_estimate is not None:
            self.progress(f"peak memory measured: {self.peak_memory / 2**30:.2f} GiB "
                          f"(estimated {self.memory_estimate.total / 2**30:.2f} GiB before loading)")

    def evaluate(self) -> evaluation.EvalResult:
        if self.model is None:
            self.load_model()
        # The base model's results stand while the base, its tokens and the test rows do.
        f, test = self.formatter, self.prep.splits["test"]
        base_key = ("evaluation", self.base_identity, self.precision, self.cfg.train.batch_size, f.max_length,
                    f.use_chat, f.instruction, tuple(f.labels), data_mod.frame_digest(test))
        target = evaluation.EvalTarget(self.model, f, self.cfg.train.batch_size, self.precision, self.progress,
                                       self.base_results, base_key, kernels.wanted(self.cfg.train.cpu_kernels))
        with ending_on_failure(self.record):
            if self.prep.task == "preference":  # held-out pairs: preference accuracy and margins
                self.eval_result = evaluation.evaluate_pairs(target, self.prep, self.cfg.eval)
            else:
                self.eval_result = evaluation.evaluate(target, self.prep, self.objective, self.cfg.eval)
            if self.general_set() is not None:  # the cost in general ability, beside the test's figures
                general = evaluation.general_loss(target, self.general_set(), self.cfg.data.seed)
                self.eval_result.metrics = self.eval_result.metrics.join(general)
        self.note(test_metrics=self.eval_result.metrics.reset_index().to_dict(orient="records"))
        return self.eval_result

    def load_trained(self, adapter_dir: str | Path | None = None):
        """The base with the adapter a run saved (default: output_dir/adapter), to probe or
        evaluate a finished run again."""
        if self.formatter is None:
            self.tokenize()
        adapter_dir = Path(adapter_dir or self.output_dir / "adapter")
        self.progress(f"loading {self.cfg.model.name} with the adapter in {adapter_dir}")
        base = modeling.load_base(self.cfg.model, self.objective, self.prep.labels, self.tokenizer.pad_token_id,
                                  self.progress)
        self.model = modeling.load_adapter(base, adapter_dir, self.cfg.model.name)
        self.record = RunRecord.reopen(adapter_dir.parent)
        return self.model

    def probe_names(self) -> list[str]:
        """probe.probes, or the probes that fit this task and model."""
        if self.formatter is None:
            self.tokenize()
        return self.cfg.probe.probes or gate.default_probes(self.prep.task, self.objective)

    def check_probes(self) -> None:
        """Before training, what would stop the probes after it: a text probe on a classification
        head, or a pair set that cannot be fetched."""
        names = self.probe_names()
        gate.check_ready(names, self.objective, self.cfg.model.name, self.progress)
        if gate.HELD_OUT in names:
            self.held_out_pairs()

    def probe_bias(self) -> gate.GateResult:
        """The chosen probes on base and tuned, checked against the gate's thresholds."""
        names = self.probe_names()
        if self.model is None:
            self.load_model()
        target = self.probe_target(self.held_out_pairs() if gate.HELD_OUT in names else None)
        with ending_on_failure(self.record):
            self.gate_result = gate.run_gate(self.cfg.probe, names, target, self.progress)
        self.note(bias_gate=self.gate_result.to_dict())
        return self.gate_result

    def probe_target(self, held_out: PairSet | None = None) -> runner.ProbeTarget:
        """The loaded model as the probes see it, the base's results kept in this session."""
        labels = list(self.prep.labels) if self.prep is not None else []
        return runner.ProbeTarget(self.model, self.tokenizer, self.formatter, labels, self.objective, self.precision,
                                  self.base_results, self.base_identity, held_out)

    def held_out_pairs(self) -> PairSet:
        """The test split's preference pairs, for the 'held-out-pairs' probe."""
        return gate.pairs_in_test_split(self.prep.task, self.prep.splits["test"])

    def write_gate(self) -> Path:
        """The bias gate's result into output_dir's report.json (runs.report.write_gate)."""
        return run_files.write_gate(self)

    def pair_set_change(self, name: str = "crows-pairs-masked", limit: int = 0) -> pd.DataFrame:
        """One pair set's likelihood probe on base and tuned, and the change, outside the gate:
        a quick look (`limit`: a seeded sample of that many pairs; 0: all)."""
        if self.model is None:
            self.load_model()
        pairs = runner.load_pair_set(name, limit=limit)
        runs = runner.pair_probe(self.probe_target(), pairs)
        return likelihood.pair_change(runs["base"], runs["tuned"])

    # -- the run record and files ------------------------------------------------------------
    def use_new_folder(self) -> None:
        """Keep an earlier run: a new one (not a resume) writes beside it, and output_dir says where.
        Under a launcher the job's folder stands: its processes cannot agree on another before
        torch.distributed starts, which is later, in the Trainer."""
        if distributed.world_size() > 1:
            return
        folder = new_folder(self.output_dir, bool(self.cfg.train.resume_from))
        if folder != self.output_dir:
            self.progress(f"{self.output_dir} holds an earlier run: this one is written to {folder}")
            self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train,
                                                                               output_dir=str(folder)))

    def note(self, **fields) -> None:
        if self.record is not None:
            self.record.update(**fields)

    def write_outputs(self) -> Path:
        """The report files into output_dir (runs.report.write_reports)."""
        return run_files.write_reports(self)

    def report(self) -> dict:
        """Everything known about the run, for report.json."""
        return run_files.run_report(self)


def refuse_unfit(cfg: RunConfig, objective: str, task: str, context: int | None) -> None:
    """What the model cannot do with these settings, said before its weights load: a max_length
    past its context, and for a classification head, any task but classification, packing, or
    padding-free batches."""
    m, t = cfg.model, cfg.train
    if context and t.max_length > context:
        raise UserError(f"train.max_length={t.max_length} is longer than {m.name}'s context of {context} "
                        f"tokens; set it to at most {context} (longer prompts are cut in the middle)")
    if objective != "head":
        return
    if task != "classification":
        raise UserError(f"a classification head needs data.task='classification'; {m.name} is an encoder, "
                        "which writes no text: for preference pairs use a decoder (e.g. smollm2-135m-instruct)"
                        if task == "preference" else "a classification head needs data.task='classification'")
    if t.packing:
        raise UserError(PACKING_NEEDS_CAUSAL_LM)
    if t.padding_free == "on":
        raise UserError(PADDING_FREE_NEEDS_CAUSAL_LM)


def run(cfg: RunConfig, callbacks=(), stop: threading.Event | None = None, progress=print, source=None) -> Session:
    """Every stage in order; returns the session with all results (files written to output_dir)."""
    session = Session(cfg, progress).setup(source)
    progress("data report:\n" + session.prep.report.summary())
    progress("tokenization (train): " + session.token_stats["train"].summary(cfg.train.max_length))
    session.load_model()
    try:
        session.train(callbacks, stop)
    finally:
        if session.train_result is None:  # interrupted: still write what is known
            session.write_outputs()
    if session.train_result.stopped:  # the user asked to stop: keep what was trained, skip the test
        session.write_outputs()
        return session
    if not distributed.is_main():  # the test runs once, on the main process
        return session
    session.evaluate()
    if cfg.probe.probes:
        progress(session.probe_bias().summary())
    session.write_outputs()
    return session
