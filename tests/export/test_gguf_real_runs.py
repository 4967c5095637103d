"""Real models trained a few steps, merged and exported as GGUF f16: the Gemma 3 270M base
(SentencePiece vocabulary of 262,144, no chat template) loaded by llama.cpp in a process of
ours, which must answer as the merged model does and stop where the Modelfile says; and a
SmolLM2 run of 3 steps, whose nearly flat logits once made a correct file fail the round trip."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SUBPROCESS_ENV

from nb_finetune import load_preset
from nb_finetune.export import export_gguf, merge, roundtrip
from nb_finetune.pipeline import Session

pytestmark = pytest.mark.slow
NEW_TOKENS = 6

# llama.cpp as a user runs the file: greedy, at most NEW_TOKENS, the Modelfile's stop strings.
ANSWER = textwrap.dedent("""
    import json, sys
    from nb_finetune.export.roundtrip import llama_cpp_model
    path, prompt, stops, most = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    llm = llama_cpp_model(path, 512)
    out = llm.create_completion(prompt, max_tokens=most, temperature=0.0, top_k=1, stop=stops)
    choice = out["choices"][0]
    print(json.dumps({"text": choice["text"], "finish": choice["finish_reason"],
                      "prompt_ids": llm.tokenize(prompt.encode(), add_bos=True, special=True)}))
""")


def trained(cfg, frame=None):
    session = Session(cfg, progress=lambda m: None)
    session.prepare_data(frame)
    session.load_model()
    session.train()
    return session


def modelfile_stops(text: str) -> list[str]:
    return [json.loads(line.split(" ", 2)[2]) for line in text.splitlines() if line.startswith("PARAMETER stop ")]


def merged_answer(model, tokenizer, prompt: str) -> tuple[list[int], list[int], bool]:
    """The merged model's prompt ids, its greedy tokens (up to NEW_TOKENS, EOS left off) and
    whether it ended at EOS."""
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = gen[0, len(ids):].tolist()
    ended = tokenizer.eos_token_id in new
    return ids, new[:new.index(tokenizer.eos_token_id)] if ended else new, ended


def llama_cpp_answer(gguf_path, prompt: str, stops: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", ANSWER, str(gguf_path), prompt, json.dumps(stops), str(NEW_TOKENS)],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.llama_cpp
def test_gemma3_run_exports_a_file_llama_cpp_answers_and_stops(gemma_dir, sst2_frame, tmp_path):
    """3 LoRA steps of the Gemma preset on 24 SST-2 rows, merged, written f16; llama.cpp, in
    another process, gives the prompts the merged model's ids, answers with its greedy tokens,
    and stops at <eos> (the Modelfile's stop) where the merged model does, else at the limit."""
    pytest.importorskip("llama_cpp")
    cfg = load_preset("gemma3-sentiment").with_overrides({
        "data.text_column": "sentence", "train.max_steps": 3, "train.batch_size": 4, "train.max_length": 48,
        "train.eval_steps": 100, "train.learning_rate": 1e-3, "model.lora_r": 4, "model.lora_alpha": 8,
        "train.output_dir": str(tmp_path / "run")})
    session = trained(cfg, sst2_frame.head(24))
    result = export_gguf(cfg, session.train_result.adapter_dir, tmp_path / "gguf", "f16", progress=lambda m: None)
    print(result.roundtrip.summary())
    assert result.roundtrip.ok and [o.reader for o in result.roundtrip.others] == ["llama.cpp"]
    stops = modelfile_stops(result.modelfile.read_text())
    assert stops == ["<eos>"]
    model, tokenizer = merge(cfg, session.train_result.adapter_dir, progress=lambda m: None)
    formatter = session.formatter
    answered = ended_somewhere = False
    for row in session.prep.splits["test"].head(3).to_dict("records"):
        prompt = formatter.prompt_text(row).rstrip()
        ids, tokens, ended = merged_answer(model.eval(), tokenizer, prompt)
        got = llama_cpp_answer(result.gguf, prompt, stops)
        print(repr(tokenizer.decode(tokens)), ended, got)
        assert got["prompt_ids"] == ids
        assert got["text"] == tokenizer.decode(tokens), (row, got)
        assert got["finish"] == ("stop" if ended else "length"), (row, got, tokens)
        answered, ended_somewhere = answered or bool(tokens), ended_somewhere or ended
    assert answered and ended_somewhere  # an answer was compared, and the stop, not only the limit


def test_smollm2_three_step_run_passes_the_round_trip(tmp_path):
    """The demo preset trained 3 steps (logits nearly as flat as the base's): its correct f16
    file passes the teacher-forced round trip, every clear position with the same top token."""
    cfg = load_preset("demo").with_overrides({"train.max_steps": 3, "train.batch_size": 4, "train.max_length": 128,
                                              "train.eval_steps": 100, "train.output_dir": str(tmp_path / "run")})
    session = trained(cfg)
    check = export_gguf(cfg, session.train_result.adapter_dir, tmp_path / "gguf", "f16",
                        progress=lambda m: None).roundtrip
    print(check.summary())
    assert check.ok and check.max_logit_diff <= roundtrip.BOUNDS["f16"]
    assert check.top1_same == check.clear > 0
    assert all(o.top1_same == o.clear > 0 for o in check.others)
