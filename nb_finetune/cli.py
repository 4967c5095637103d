"""`nb-finetune`: the same configs and engine as the panels, headless.

Exit status: 0 done; 2 a problem the user can fix, said in one line on stderr (no traceback);
3 the bias gate failed (a probe moved the wrong way beyond its threshold, see `probe:`);
130 stopped by Ctrl-C, after the current step, with a checkpoint kept.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import yaml

from .errors import UserError
from .quiet import quiet_libraries
from .redact import redact


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: write section.field=value, e.g. train.max_steps=5")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def config_from(args):
    """The config of --config or --preset, with --set overrides."""
    from .config import RunConfig, load_preset
    cfg = load_preset(args.preset) if args.preset else RunConfig.load(args.config)
    overrides = _parse_set(args.set)
    return cfg.with_overrides(overrides) if overrides else cfg


def set_up_process(cfg) -> None:
    """What the command line settles for its whole process before the libraries load: huge
    pages for torch's tensors where the CPU kernels are on, and quiet libraries."""
    if cfg.train.cpu_kernels != "off":
        # Before torch allocates anything: it reads the huge-page setting once, at its first allocation.
        from .kernels.allocator import huge_pages_for_tensors
        huge_pages_for_tensors()
    quiet_libraries()


def _run(cfg) -> int:
    set_up_process(cfg)
    from . import distributed, pipeline, training
    if not distributed.is_main():  # under a launcher, only the main process talks
        return _run_quietly(cfg)
    stop = threading.Event()
    print(f"output folder: {cfg.train.output_dir}")
    resume = (f"{cfg.train.output_dir}; resume with the same command and --set train.resume_from=last")
    try:
        with first_ctrl_c_stops(stop):
            session = pipeline.run(cfg, callbacks=[training.ConsoleProgress()], stop=stop, progress=print)
    except KeyboardInterrupt:
        print(f"\naborted: the last checkpoint and the history are kept in {resume}", file=sys.stderr)
        return 130
    if session.train_result.stopped:
        print(f"stopped at step {session.train_result.global_step}: checkpoint, adapter and history are in "
              f"{resume}", file=sys.stderr)
        return 130
    print("\ntest results:\n" + session.eval_result.summary())
    if len(session.eval_result.samples):
        print("\nsamples (base vs tuned):\n" + session.eval_result.samples.to_string(index=False))
    print(f"\nadapter, history and reports written to {session.output_dir}")
    return gate_status(session.gate_result)


@contextmanager
def first_ctrl_c_stops(stop: threading.Event):
    """The first Ctrl-C asks training to stop after this step and save; a second one aborts."""
    previous = signal.getsignal(signal.SIGINT)

    def first_interrupt(signum, frame):
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)
        stop.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, first_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def gate_status(result) -> int:
    """3 when the bias gate failed, so a pipeline stops; 0 otherwise."""
    from .probes.gate import EXIT_FAILED
    if result is not None and result.failed:
        print("bias gate failed: see bias_gate in report.json", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _run_quietly(cfg) -> int:
    from . import pipeline
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())  # the main process reports the stop
    pipeline.run(cfg, stop=stop, progress=lambda message: None)
    return 0


def cmd_demo(args) -> int:
    from .config import load_preset
    cfg = load_preset("demo")
    overrides = _parse_set(args.set)
    if args.output:
        overrides["train.output_dir"] = args.output
    return _run(cfg.with_overrides(overrides) if overrides else cfg)


def cmd_run(args) -> int:
    return _run(config_from(args))


def cmd_export(args) -> int:
    from .export import export_job
    cfg = config_from(args)
    if args.gguf:
        return cmd_export_gguf(cfg, args)
    if not args.output:
        raise UserError("export needs --output DIR for the job folder, or --gguf TYPE for a GGUF model")
    folder = export_job(cfg, args.output)
    print(f"job written to {folder}: config.yaml, launch_torchrun.sh, launch_accelerate.sh, accelerate configs "
          f"(DDP, FSDP, DeepSpeed); see {folder / 'README.md'}")
    return 0


def ask(question: str) -> bool:
    """Yes only when the person at the terminal types y or yes."""
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_export_gguf(cfg, args) -> int:
    from .export import export_gguf
    quiet_libraries()
    adapter = Path(args.adapter or Path(cfg.train.output_dir) / "adapter")
    out = Path(args.out or args.output or Path(cfg.train.output_dir) / f"gguf-{args.gguf}")
    force = args.force or (out.exists() and sys.stdin.isatty() and ask(f"{out} exists: replace it? [y/N] "))
    template = {"yes": True, "no": False}.get(args.chat_template)
    result = export_gguf(cfg, adapter, out, args.gguf, force=force, progress=print, chat_template=template)
    print(result.roundtrip.summary())
    print(f"written: {result.gguf} and {result.modelfile}; run it with: "
          f"cd {result.folder} && ollama create {result.folder.name} -f Modelfile")
    return 0


def cmd_probe(args) -> int:
    """The bias probes on a saved run: its base and its adapter, report.json updated."""
    import json

    cfg = config_from(args)
    set_up_process(cfg)
    from .pipeline import Session
    session = Session(cfg, progress=print)
    session.check_probes()
    session.load_trained(args.adapter)
    result = session.probe_bias()
    print(result.summary())
    report = session.output_dir / "report.json"
    saved = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else session.report()
    report.write_text(redact(json.dumps(saved | {"bias_gate": result.to_dict()}, indent=2, default=str)),
                      encoding="utf-8")
    print(f"bias_gate written to {report}")
    return gate_status(result)


def cmd_runs(args) -> int:
    """A folder of runs on the command line: list, show one, diff two configs, compare a few."""
    from . import runs
    found, skipped = runs.find_runs(args.dir)
    baseline = runs.find(found, args.baseline) if args.baseline else None
    if args.action == "list":
        print(runs.table(found, baseline or (found[-1] if found else None)).round(4).to_string(index=False)
              if found else f"no runs in {args.dir}")
    elif args.action == "show":
        print(runs.show(one_run(found, args.names, 1)[0]))
    elif args.action == "diff":
        a, b = one_run(found, args.names, 2)
        diff = runs.config_diff(a, b)
        print(diff.to_string() if len(diff) else f"{a.name} and {b.name} have the same settings")
    else:
        chosen = one_run(found, args.names, len(args.names) or 2)
        print(runs.table(chosen, baseline or chosen[0]).round(4).to_string(index=False))
    if skipped:
        print(f"({skipped} folder(s) with a history or report but no readable run record skipped)")
    return 0


def one_run(found, names: list[str], count: int) -> list:
    from . import runs
    if len(names) != count:
        raise UserError(f"give {count} run name(s) (see `nb-finetune runs list`)")
    return [runs.find(found, name) for name in names]


def cmd_sweep(args) -> int:
    from . import sweep, training
    cfg = config_from(args)
    grid = sweep.parse_grid(args.grid)
    set_up_process(cfg)
    stop = threading.Event()
    with first_ctrl_c_stops(stop):
        result = sweep.run_sweep(cfg, grid, stop, print, callbacks=[training.ConsoleProgress()], prune=args.prune)
    print(f"\nsweep in {result.folder}, ranked by validation loss:\n" + result.table().to_string(index=False))
    if args.prune is not None:
        print(f"pruning stopped {len(result.pruned)} run(s) early and saved {result.pruned_steps} training steps")
    return 130 if result.stopped else 0


def cmd_validate(args) -> int:
    from .config import RunConfig
    from .data import prepare
    cfg = RunConfig.load(args.config)
    print("config: ok")
    prep = prepare(cfg.data)
    print("data report:\n" + prep.report.summary())
    return 0


def cmd_assets(args) -> int:
    from . import assets
    quiet_libraries()
    if args.action == "list":
        import pandas as pd
        print(f"asset cache: {assets.cache_dir()}  (set NB_FINETUNE_CACHE to move it)")
        print(pd.DataFrame(assets.listing()).to_string(index=False))
        return 0
    paths = assets.fetch(args.names)
    for p in paths:
        print(p)
    return 0


def cmd_presets(args) -> int:
    from .config import load_preset, presets
    if args.name:
        print(load_preset(args.name).to_yaml())
    else:
        print("\n".join(presets()))
    return 0


def _add_overrides(parser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. train.max_steps=5 (repeatable)")


def _add_config_source(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config file (YAML or JSON)")
    src.add_argument("--preset", help="a shipped preset (see `nb-finetune presets`)")
    _add_overrides(parser)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nb-finetune", description="Fine-tune language models with LoRA/QLoRA.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="SmolLM2-135M-Instruct learns IMDB sentiment, offline, in minutes on a CPU")
    d.add_argument("--output", help="output folder (default runs/demo)")
    _add_overrides(d)
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("run", help="run a saved config (YAML or JSON)")
    _add_config_source(r)
    r.set_defaults(func=cmd_run)
    e = sub.add_parser("export", help="write a job folder for torchrun / accelerate (config + launch scripts), "
                                      "or with --gguf the tuned model as GGUF for llama.cpp / Ollama")
    _add_config_source(e)
    e.add_argument("--output", help="job folder to write")
    e.add_argument("--gguf", metavar="TYPE", help="write the merged model as GGUF: f16, q8_0 or q4_0")
    e.add_argument("--out", help="GGUF folder (default: <train.output_dir>/gguf-TYPE)")
    e.add_argument("--adapter", help="adapter folder (default: <train.output_dir>/adapter)")
    e.add_argument("--force", action="store_true", help="replace an existing output folder (asked at a terminal)")
    e.add_argument("--chat-template", choices=("yes", "no"), help="GGUF: require the tokenizer's chat template "
                   "(yes) or leave it out (no); default: stored where the tokenizer has one")
    e.set_defaults(func=cmd_export)
    pr = sub.add_parser("probe", help="run the bias probes (probe: settings) on a saved run's base and adapter; "
                                      "exit status 3 when the bias gate fails")
    _add_config_source(pr)
    pr.add_argument("--adapter", help="adapter folder (default: <train.output_dir>/adapter)")
    pr.set_defaults(func=cmd_probe)
    rn = sub.add_parser("runs", help="the runs in a folder: list (the default), show NAME, diff A B, "
                                     "compare A B [C ...]")
    rn.add_argument("action", nargs="?", default="list", choices=("list", "show", "diff", "compare"))
    rn.add_argument("names", nargs="*", help="run names as `runs list` shows them")
    rn.add_argument("--dir", default="runs", help="the folder of runs (default: runs)")
    rn.add_argument("--baseline", help="the run the others are compared with (default: the oldest)")
    rn.set_defaults(func=cmd_runs)
    sw = sub.add_parser("sweep", help="train every combination of a few settings, one run after another")
    _add_config_source(sw)
    sw.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                    help="a setting and its values, e.g. train.learning_rate=1e-4,3e-4 (repeatable)")
    sw.add_argument("--prune", type=float, metavar="MARGIN", help="stop a run whose validation loss trails the "
                    "best earlier run's at the same step by more than MARGIN (0.1: 10%%)")
    sw.set_defaults(func=cmd_sweep)
    v = sub.add_parser("validate", help="check a config and its data without training")
    v.add_argument("--config", required=True)
    v.set_defaults(func=cmd_validate)
    a = sub.add_parser("assets", help="built-in models and data sets")
    a.add_argument("action", choices=("list", "fetch"))
    a.add_argument("names", nargs="*", help="assets to fetch (default: all)")
    a.set_defaults(func=cmd_assets)
    ps = sub.add_parser("presets", help="list shipped presets, or print one")
    ps.add_argument("name", nargs="?")
    ps.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        return args.func(args)
    except UserError as err:
        print(f"nb-finetune: error: {redact(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
