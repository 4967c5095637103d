"""Check a written GGUF against the model it came from, through independent readers.

Each reader runs in a separate Python process, so nothing from the writer's memory can hide a
mistake: transformers' GGUF loader (`gguf_file=`), with the tokenizer and chat template read
from the file, always; and llama.cpp itself through llama-cpp-python (`llama_cpp`), with its own
tokenizer, when that optional package is installed. A reader sends back, per prompt, the token
ids of the chat-templated prompt, the logits over it and a greedy generation; this process runs
the same on the merged model and compares.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError

PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.",
           "Name three colours.")
# Largest |logit difference| / largest |logit| over the prompts, per quant type, for every
# reader (llama.cpp rounds activations too; the same bounds are asked of it). f16 rounds each
# weight to 11 significant bits; q8_0 to 8 bits per 32-value block; q4_0 to 4 bits, enough to
# move a small model's logits by as much as the largest one, so its bound only catches a broken
# file (wrong layout, lost tensors) and its answers may differ from the merged model's.
BOUNDS = {"f16": 0.01, "q8_0": 0.15, "q4_0": 1.0}
MAX_NEW_TOKENS = 24
LLAMA_CPP = "llama.cpp"


@functools.cache
def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@dataclass
class RoundTrip:
    quant: str
    max_logit_diff: float = 0.0  # relative to the largest |logit|
    bound: float = 0.0
    greedy_same: list[bool] = field(default_factory=list)
    stops: list[bool] = field(default_factory=list)  # the GGUF's generation ended at end-of-turn
    problems: list[str] = field(default_factory=list)
    reader: str = "transformers"
    others: list[RoundTrip] = field(default_factory=list)  # the same check through other readers

    @property
    def ok(self) -> bool:
        return not self.problems and all(o.ok for o in self.others)

    def summary(self) -> str:
        own = (f"round trip ({self.quant}, read back by {self.reader}): largest logit difference "
               f"{self.max_logit_diff:.2%} of the largest logit (bound {self.bound:.0%}); greedy answers "
               f"identical on {sum(self.greedy_same)}/{len(self.greedy_same)} prompts; stopped at "
               f"end-of-turn on {sum(self.stops)}/{len(self.stops)}"
               + ("" if not self.problems else "; FAILED: " + "; ".join(self.problems)))
        return "; ".join([own] + [o.summary() for o in self.others])


def run_prompts(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Per prompt: ids of the chat-templated prompt, its logits, the greedy continuation."""
    import torch
    out = []
    for prompt in prompts:
        chat = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0].float().numpy()
            gen = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out.append({"ids": ids[0].tolist(), "logits": logits, "generated": gen[0, ids.shape[1]:].tolist(),
                    "eos": tokenizer.eos_token_id,
                    "text": tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)})
    return out


def transformers_answers(gguf_path: str) -> list[dict]:
    """transformers loads the GGUF, tokenizer and chat template included, and answers the prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return run_prompts(model, tokenizer)


def llama_cpp_answers(gguf_path: str, texts: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """llama.cpp loads the GGUF and answers the chat-templated prompt texts, tokenized by its own
    tokenizer (the file's tokens, merges and pre-tokenizer name), greedily."""
    from llama_cpp import Llama
    llm = Llama(model_path=gguf_path, n_ctx=512, logits_all=True, verbose=False, seed=0)
    eos, out = llm.token_eos(), []
    for text in texts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
        generated = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            generated.append(int(token))
            if token == eos or len(generated) == max_new_tokens:
                break
        out.append({"ids": list(ids), "logits": logits, "generated": generated, "eos": eos, "text": text})
    return out


def gguf_side(gguf_path: str, out_path: str, reader: str = "transformers", texts: tuple[str, ...] = ()) -> None:
    """Runs in the child process: one reader's answers, saved for the parent."""
    results = llama_cpp_answers(gguf_path, list(texts)) if reader == LLAMA_CPP else transformers_answers(gguf_path)
    np.savez(out_path, logits=np.array([r.pop("logits") for r in results], dtype=object),
             meta=json.dumps(results))


def read_back(gguf_path: Path, reader: str = "transformers", texts: tuple[str, ...] = ()) -> list[dict]:
    """A reader's answers, from a fresh Python process."""
    root = str(Path(__file__).resolve().parents[2])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "answers.npz")
        code = (f"import sys; sys.path.insert(0, {root!r}); from nb_finetune.export.roundtrip import gguf_side; "
                f"gguf_side({str(gguf_path)!r}, {out!r}, {reader!r}, {tuple(texts)!r})")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise UserError(f"GGUF round trip: {reader} could not load {gguf_path.name}: {tail[0]}")
        data = np.load(out, allow_pickle=True)
        results = json.loads(str(data["meta"]))
        for r, logits in zip(results, data["logits"]):
            r["logits"] = logits
    return results


def compare(ours: list[dict], theirs: list[dict], quant: str, reader: str = "transformers") -> RoundTrip:
    report = RoundTrip(quant=quant, bound=BOUNDS[quant], reader=reader)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a["ids"] != b["ids"]:
            report.problems.append(f"prompt {i + 1} tokenizes differently (tokenizer or chat template lost)")
            continue
        if a["eos"] != b["eos"]:
            report.problems.append(f"end-of-turn token {b['eos']} instead of {a['eos']}")
        scale = float(np.abs(a["logits"]).max()) or 1.0
        report.max_logit_diff = max(report.max_logit_diff, float(np.abs(a["logits"] - b["logits"]).max()) / scale)
        report.greedy_same.append(a["generated"] == b["generated"])
        report.stops.append(b["eos"] in b["generated"])
        if quant == "f16" and report.stops[-1] != (a["eos"] in a["generated"]):
            report.problems.append(f"prompt {i + 1}: stops at end-of-turn in one model and not the other")
    if report.max_logit_diff > report.bound:
        report.problems.append(f"logits differ by {report.max_logit_diff:.2%} (bound {report.bound:.0%})")
    if quant == "f16" and not all(report.greedy_same):
        report.problems.append("greedy answers differ from the merged model's")
    return report


def readers() -> list[str]:
    return ["transformers"] + ([LLAMA_CPP] if llama_cpp_available() else [])


def verify(model, tokenizer, gguf_path: Path, quant: str) -> RoundTrip:
    """Compare the merged model with its GGUF as each reader reads it, each in another process."""
    ours = run_prompts(model.eval(), tokenizer)
    report = compare(ours, read_back(Path(gguf_path)), quant)
    if llama_cpp_available():
        texts = tuple(r["text"] for r in ours)
        report.others.append(compare(ours, read_back(Path(gguf_path), LLAMA_CPP, texts), quant, LLAMA_CPP))
    return report
