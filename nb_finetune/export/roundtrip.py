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
# Largest |logit difference| / largest |logit| along the merged model's greedy continuation, per
# quant type, for every reader (llama.cpp rounds activations too; the same bounds are asked of
# it). f16 rounds each weight to 11 significant bits; q8_0 to 8 bits per 32-value block; q4_0 to
# 4 bits, enough to move a small model's logits by as much as the largest one, so its bound only
# catches a broken file (wrong layout, lost tensors).
BOUNDS = {"f16": 0.01, "q8_0": 0.15, "q4_0": 1.0}
MAX_NEW_TOKENS = 24
LLAMA_CPP = "llama.cpp"
TRANSFORMERS = "transformers"
# The inverse of the writer's layout into a fresh model of the family (gguf_reader), for the
# families transformers' GGUF loader does not know.
GGUF_READER = "gguf-reader"


@functools.cache
def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@functools.cache
def transformers_reads(arch: str) -> bool:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    return arch in GGUF_SUPPORTED_ARCHITECTURES


@dataclass
class RoundTrip:
    quant: str
    max_logit_diff: float = 0.0  # relative to the largest |logit|
    bound: float = 0.0
    positions: int = 0  # positions compared, prompts and continuations together
    clear: int = 0  # of them, where the merged model's top-two margin exceeds the bound
    top1_same: int = 0  # of the clear ones, where the reader's top token is the merged model's
    stops: list[bool] = field(default_factory=list)  # per prompt that ends at end-of-turn: the GGUF ends too
    problems: list[str] = field(default_factory=list)
    reader: str = TRANSFORMERS
    others: list[RoundTrip] = field(default_factory=list)  # the same check through other readers

    @property
    def ok(self) -> bool:
        return not self.problems and all(o.ok for o in self.others)

    def summary(self) -> str:
        own = (f"round trip ({self.quant}, read back by {self.reader}): largest logit difference "
               f"{self.max_logit_diff:.2%} of the largest logit (bound {self.bound:.0%}) over {self.positions} "
               f"positions of the merged model's greedy answers; same top token at {self.top1_same}/{self.clear} "
               f"positions with a margin above the bound; stopped at end-of-turn on {sum(self.stops)}/"
               f"{len(self.stops)} answers that end there"
               + ("" if not self.problems else "; FAILED: " + "; ".join(self.problems)))
        return "; ".join([own] + [o.summary() for o in self.others])


def prompt_ids(tokenizer, prompt: str, chat: bool) -> tuple[list[int], str, bool]:
    """(ids, text, whether the tokenizer added its special tokens) of a prompt, chat-templated
    where the tokenizer has a template."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"], text, False
    return tokenizer(prompt)["input_ids"], prompt, True


def run_prompts(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Per prompt: its ids, the greedy continuation, and the logits at every position of both."""
    import torch
    chat, out = bool(tokenizer.chat_template), []
    for prompt in prompts:
        ids, text, added = prompt_ids(tokenizer, prompt, chat)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            sequence = gen[0].tolist()
            logits = model(torch.tensor([sequence])).logits[0].float().numpy()
        out.append({"ids": ids, "sequence": sequence, "logits": logits, "eos": tokenizer.eos_token_id,
                    "text": text, "added": added, "prompt": prompt, "chat": chat})
    return out


def teacher_forced(model, sequences: list[list[int]]) -> list:
    import torch
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].float().numpy() for s in sequences]


def transformers_answers(gguf_path: str, requests: list[dict]) -> list[dict]:
    """transformers loads the GGUF, tokenizer and chat template included: its ids for each prompt
    and its logits along the merged model's sequences."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                       output_loading_info=True)
    answers = tokenizer_answers(tokenizer, requests, teacher_forced(model.eval(), [r["sequence"] for r in requests]))
    answers[0]["missing"] = sorted(info["missing_keys"])  # the loader fills what the file lacks at random
    return answers


def tokenizer_answers(tokenizer, requests: list[dict], logits: list) -> list[dict]:
    return [{"ids": prompt_ids(tokenizer, r["prompt"], r["chat"])[0], "logits": lg, "eos": tokenizer.eos_token_id}
            for r, lg in zip(requests, logits)]


def gguf_reader_answers(gguf_path: str, requests: list[dict], config_dir: str) -> list[dict]:
    """The file mapped back by gguf.GGUFReader through the inverse layout into a fresh model."""
    from .gguf_reader import load_model, load_tokenizer
    model = load_model(gguf_path, config_dir)
    return tokenizer_answers(load_tokenizer(gguf_path), requests,
                             teacher_forced(model, [r["sequence"] for r in requests]))


def llama_cpp_model(gguf_path: str, n_ctx: int, **kwargs):
    """llama.cpp's model of the file, with its extra buffer types off: they only repack weights
    for faster kernels (AMX for q8_0), and a CPU that reports AMX it cannot run, as some virtual
    machines do, dies of an illegal instruction there. llama-cpp-python has no argument for it,
    so its default model parameters are changed while it loads (in the reader's own process)."""
    from llama_cpp import llama
    default = llama.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    llama.llama_cpp.llama_model_default_params = params
    try:
        return llama.Llama(model_path=gguf_path, n_ctx=n_ctx, verbose=False, seed=0, **kwargs)
    finally:
        llama.llama_cpp.llama_model_default_params = default


def llama_cpp_answers(gguf_path: str, requests: list[dict]) -> list[dict]:
    """llama.cpp loads the GGUF: its own tokenizer's ids for each prompt text (the file's tokens,
    merges or scores, pre-tokenizer name) and its logits along the merged model's sequences."""
    n_ctx = max(len(r["sequence"]) for r in requests) + 8
    llm = llama_cpp_model(gguf_path, n_ctx, logits_all=True)
    out = []
    for r in requests:
        ids = llm.tokenize(r["text"].encode("utf-8"), add_bos=r["added"], special=True)
        llm.reset()
        llm.eval(r["sequence"])
        logits = np.array(llm.scores[:len(r["sequence"])], dtype=np.float32)
        out.append({"ids": list(ids), "logits": logits, "eos": llm.token_eos()})
    return out


def gguf_side(gguf_path: str, out_path: str, reader: str, requests_path: str, config_dir: str = "") -> None:
    """Runs in the child process: one reader's answers, saved for the parent."""
    requests = json.loads(Path(requests_path).read_text())
    if reader == LLAMA_CPP:
        results = llama_cpp_answers(gguf_path, requests)
    elif reader == GGUF_READER:
        results = gguf_reader_answers(gguf_path, requests, config_dir)
    else:
        results = transformers_answers(gguf_path, requests)
    np.savez(out_path, logits=np.array([r.pop("logits") for r in results], dtype=object),
             meta=json.dumps(results))


def read_back(gguf_path: Path, reader: str, ours: list[dict], config_dir: str = "") -> list[dict]:
    """A reader's answers, from a fresh Python process."""
    root = str(Path(__file__).resolve().parents[2])
    keys = ("sequence", "text", "added", "prompt", "chat")
    with tempfile.TemporaryDirectory() as tmp:
        out, requests = os.path.join(tmp, "answers.npz"), os.path.join(tmp, "requests.json")
        Path(requests).write_text(json.dumps([{k: r[k] for k in keys} for r in ours]))
        code = (f"import sys; sys.path.insert(0, {root!r}); from nb_finetune.export.roundtrip import gguf_side; "
                f"gguf_side({str(gguf_path)!r}, {out!r}, {reader!r}, {requests!r}, {config_dir!r})")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise UserError(f"GGUF round trip: {reader} could not load {gguf_path.name}: {tail[0]}")
        data = np.load(out, allow_pickle=True)
        results = json.loads(str(data["meta"]))
        for r, logits in zip(results, data["logits"]):
            r["logits"] = logits
    return results


def compare_one(report: "RoundTrip", i: int, a: dict, b: dict) -> None:
    """One prompt: ids, end-of-turn id, the logits at every position, the top token wherever the
    merged model's margin between its first and second choice exceeds the bound."""
    if b.get("missing"):
        report.problems.append(f"tensors missing from the file: {', '.join(b['missing'])}")
    if a["ids"] != b["ids"]:
        report.problems.append(f"prompt {i + 1} tokenizes differently (wrong vocabulary or chat template)")
    if a["eos"] != b["eos"]:
        report.problems.append(f"end-of-turn token {b['eos']} instead of {a['eos']}")
    ours, theirs = a["logits"], b["logits"]
    scale = float(np.abs(ours).max()) or 1.0
    report.max_logit_diff = max(report.max_logit_diff, float(np.abs(ours - theirs).max()) / scale)
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) / scale > report.bound
    same = ours.argmax(-1) == theirs.argmax(-1)
    report.positions += len(ours)
    report.clear += int(clear.sum())
    report.top1_same += int((same & clear).sum())
    if a["sequence"][-1] == a["eos"]:  # the merged model ended its answer: the GGUF must too
        report.stops.append(bool(same[-2]) or not bool(clear[-2]))


def compare(ours: list[dict], theirs: list[dict], quant: str, reader: str = TRANSFORMERS) -> RoundTrip:
    report = RoundTrip(quant=quant, bound=BOUNDS[quant], reader=reader)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        compare_one(report, i, a, b)
    if report.max_logit_diff > report.bound:
        report.problems.append(f"logits differ by {report.max_logit_diff:.2%} (bound {report.bound:.0%})")
    if report.top1_same < report.clear:
        report.problems.append(f"a different top token at {report.clear - report.top1_same} positions where the "
                               "merged model's margin exceeds the bound")
    if not all(report.stops):
        report.problems.append("does not stop at end-of-turn where the merged model stops")
    return report


def readers(arch: str = "llama") -> list[str]:
    """Who reads the file back: transformers where its GGUF loader knows the architecture, the
    inverse-layout reader where not, and llama.cpp too when installed."""
    return [TRANSFORMERS if transformers_reads(arch) else GGUF_READER] + ([LLAMA_CPP] if llama_cpp_available() else [])


def verify(model, tokenizer, gguf_path: Path, quant: str) -> RoundTrip:
    """Compare the merged model with its GGUF as each reader reads it, each in another process."""
    from .gguf_file import architecture
    ours = run_prompts(model.eval(), tokenizer)
    first, *rest = readers(architecture(model.config))
    with tempfile.TemporaryDirectory() as config_dir:
        model.config.save_pretrained(config_dir)  # the family, for the inverse-layout reader
        report = compare(ours, read_back(Path(gguf_path), first, ours, config_dir), quant, first)
        # A file the first reader failed is refused already; llama.cpp, which will not load a file
        # with a tensor missing, would only hide what the first reader named.
        for reader in rest if report.ok else ():
            report.others.append(compare(ours, read_back(Path(gguf_path), reader, ours, config_dir), quant, reader))
    return report
