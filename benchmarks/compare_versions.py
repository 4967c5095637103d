"""This checkout against an earlier commit: the same training, its speed and its history.

For a change meant to leave behaviour alone (a restructuring, a refactor): a preset's training
(data, tokenization, model and training, no evaluation) run from this working tree and from a
git ref, each in a fresh process, alternating, `--repeats` times. Prints each side's training
seconds (medians), their ratio, and the largest difference between the two histories (losses,
accuracy, learning rate; not their timings), which should be 0 on one machine. Each process is
set up as the command line sets it up (cli.set_up_process: huge pages where the kernels are
on) where that version has the function; versions up to c99c03d set huge pages on import.

Writes benchmarks/results/compare_versions-<cpu>-<date>.json. Run from the repository root:
    python benchmarks/compare_versions.py --ref c99c03d
    python benchmarks/compare_versions.py --ref HEAD~3 --preset demo --steps 6 --repeats 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def child(preset: str, steps: int, out: str) -> dict:
    """Train the preset for `steps` steps with the nb_finetune on sys.path; seconds and history."""
    from nb_finetune import load_preset
    cfg = load_preset(preset).with_overrides({"train.max_steps": steps, "train.output_dir": out})
    try:  # as the command line does, before torch allocates anything
        from nb_finetune.cli import set_up_process
        set_up_process(cfg)
    except ImportError:
        pass  # a version that set huge pages when imported
    try:
        from nb_finetune.pipeline import Session
    except ImportError:
        from nb_finetune.job import Session  # before the pipeline module had that name
    import nb_finetune
    session = Session(cfg, progress=lambda message: None)
    session.prepare_data()
    session.tokenize()
    session.load_model()
    result = session.train()
    history = result.history.select_dtypes("number")
    history = history.drop(columns=[c for c in history if "second" in c])  # timings differ run to run
    return {"package": str(Path(nb_finetune.__file__).parent), "seconds": result.seconds, "steps": result.global_step,
            "history": history.to_dict(orient="list")}


def run_child(root: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, PYTHONPATH=str(root), TOKENIZERS_PARALLELISM="false")
        done = subprocess.run([sys.executable, __file__, "--child", "--preset", args.preset, "--steps", str(args.steps),
                               "--out", out], cwd=out, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"training from {root} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two histories; inf where their columns, lengths
    or missing values (a validation step on one side only) differ."""
    import numpy as np
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for column in a:
        x, y = np.array(a[column], dtype=float), np.array(b[column], dtype=float)
        if x.shape != y.shape or (np.isnan(x) != np.isnan(y)).any():
            return float("inf")
        worst = max(worst, float(np.nanmax(np.abs(x - y), initial=0.0)))
    return worst


def compare(ref_root: Path, args) -> dict:
    import statistics
    sides = {"this tree": REPO, args.ref: ref_root}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    histories: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name, root in sides.items():
            got = run_child(root, args)
            seconds[name].append(got["seconds"])
            histories.setdefault(name, got["history"])
            assert Path(got["package"]).is_relative_to(root), f"{name} ran the package at {got['package']}"
            print(f"repeat {repeat + 1}: {name:>12}  {got['steps']} steps in {got['seconds']:.1f} s", flush=True)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    return {"seconds": seconds, "median seconds": medians,
            "this tree / ref speed": medians[args.ref] / medians["this tree"],
            "largest history difference": largest_difference(*histories.values())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="", help="the git commit (or branch, tag) to compare against")
    p.add_argument("--preset", default="demo")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    p.add_argument("--out", default="", help="the results file, or the child's output folder")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.preset, args.steps, args.out)))
        return 0
    if not args.ref:
        p.error("--ref is required: the commit to compare this tree against")
    from train_speed import machine, short_name
    described = machine()
    with tempfile.TemporaryDirectory() as tmp:
        ref_root = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(ref_root), args.ref], check=True)
        try:
            figures = compare(ref_root, args)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(ref_root)], check=False)
    print("\nmedian training seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in figures["median seconds"].items()))
    print(f"this tree's speed / {args.ref}'s: {figures['this tree / ref speed']:.3f}")
    print(f"largest difference between the histories: {figures['largest history difference']:.3g}")
    path = Path(args.out) if args.out else \
        HERE / "results" / f"compare_versions-{short_name(described['cpu'])}-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "compare_versions", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                "machine": described, "ref": args.ref,
                                "ref commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", args.ref],
                                                             capture_output=True, text=True).stdout.strip(),
                                "settings": {"preset": args.preset, "steps": args.steps, "repeats": args.repeats},
                                **figures}, indent=1) + "\n")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
