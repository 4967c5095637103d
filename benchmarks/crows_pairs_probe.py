"""CrowS-Pairs on SmolLM2-135M-Instruct: the batched probe against scoring one sentence at a
time (the plain loop most scripts write), on the same pairs, in one run.

    python benchmarks/crows_pairs_probe.py [--pairs 1508] [--baseline-pairs 100]

Prints pairs/s of both, the agreement of their scores, and the probe's summary by bias type.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from nb_finetune import assets
from nb_finetune.probes.likelihood import probe_pairs
from nb_finetune.probes.pairs import PairSet, crows_pairs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "crows_pairs" / "crows_pairs_anonymized.csv"


def one_at_a_time(model, tok, sentences):
    out = []
    for s in sentences:
        ids = torch.tensor([[tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        out.append(float(logp.gather(-1, ids[0, 1:, None]).sum()))
    return np.array(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=1508)
    ap.add_argument("--baseline-pairs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = assets.model_path("smollm2-135m-instruct", progress=lambda m: None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    pairs = crows_pairs(DATA)
    pairs = PairSet(pairs.name, pairs.items.head(args.pairs))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32")

    start = time.perf_counter()
    result = probe_pairs(model, tok, pairs, batch_size=args.batch_size, progress=lambda m: None)
    batched = time.perf_counter() - start

    sub = pairs.items.head(args.baseline_pairs)
    start = time.perf_counter()
    plain_more = one_at_a_time(model, tok, list(sub["more"]))
    plain_less = one_at_a_time(model, tok, list(sub["less"]))
    plain = time.perf_counter() - start

    agree = np.abs(np.r_[plain_more, plain_less]
                   - np.r_[result.scores["more_logprob"][:len(sub)], result.scores["less_logprob"][:len(sub)]]).max()
    print(f"{'method':<28}{'pairs':>7}{'seconds':>10}{'pairs/s':>10}")
    print(f"{'nb_finetune batched probe':<28}{len(pairs.items):>7}{batched:>10.1f}{len(pairs.items) / batched:>10.1f}")
    print(f"{'one sentence at a time':<28}{len(sub):>7}{plain:>10.1f}{len(sub) / plain:>10.1f}")
    print(f"speed-up {len(pairs.items) / batched / (len(sub) / plain):.1f}x; largest score difference "
          f"between the two: {agree:.2e} nats")
    print(result.summary[["pairs", "stereotype_preferred", "stereotype_preferred_low", "stereotype_preferred_high",
                          "mean_difference"]].to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
