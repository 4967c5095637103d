"""The whole job on the real Gemma 3 270M (a base model with a SentencePiece vocabulary of
262,144 and no chat template), kept small: a few rows, a few steps, short rows."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SUBPROCESS_ENV, sst2_dev

from nb_finetune import config, data, load_preset
from nb_finetune.data.collator import token_table
from nb_finetune.data.formatter import IGNORE, Formatter
from nb_finetune.pipeline import Session, run
from nb_finetune.render.tables import tokens_html
from nb_finetune.training import Callback

pytestmark = pytest.mark.slow

SMALL = {"train.max_steps": 2, "train.batch_size": 4, "train.max_length": 64, "train.eval_steps": 100,
         "train.logging_steps": 1, "model.lora_r": 4, "model.lora_alpha": 8}


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gemma_dir)


@pytest.fixture(scope="module")
def sst2_rows(shared_data):
    frame = sst2_dev(shared_data).groupby("label").head(12).reset_index(drop=True)
    return data.normalize(frame, config.DataConfig(task="classification", text_column="sentence",
                                                   label_names={"0": "negative", "1": "positive"}))


def test_token_preview_shows_sentencepiece_pieces_and_trains_the_label_word(gemma_tokenizer, sst2_rows,
                                                                          tiny_model_dir, tmp_path):
    """No chat template: plain text after <bos>, the label word and <eos> trained, everything
    before masked; the pieces' text joins back into the rendered row (a '▁' piece shows as a
    space, drawn as a middle dot); the labels are those TRL's SFTTrainer makes of the row as
    prompt and completion (completion-only loss, its EOS appended)."""
    fmt = Formatter.build(gemma_tokenizer, "classification", ["negative", "positive"], 64)
    assert not fmt.use_chat
    row = sst2_rows.iloc[0].to_dict()
    table = token_table(fmt, row, pad_to=70)
    assert table["token"].iloc[0] == "<bos>" and table["role"].iloc[0] == "special"
    trained = table[table["label"] != IGNORE]
    assert list(trained["token"]) == [" " + row["label"], "<eos>"] and set(trained["role"]) == {"response"}
    assert (table["role"].iloc[:trained.index[0]] != "response").all() and table["role"].iloc[-1] == "padding"
    pieces = gemma_tokenizer.convert_ids_to_tokens(trained["id"].iloc[:1].tolist())
    assert pieces == ["▁" + row["label"]]
    text, _ = fmt.render(row)
    assert "".join(table[table["role"] != "padding"]["token"]) == "<bos>" + text + "<eos>"
    assert f"&middot;{row['label']}" in tokens_html(table)
    encoded = fmt.encode(row)
    assert trl_labels(gemma_tokenizer, text, fmt.render(row)[1][0][0], tiny_model_dir, tmp_path) == encoded["labels"]


def trl_labels(tokenizer, text: str, start: int, model_dir, out) -> list[int]:
    """TRL's labels for `text` split at `start` into prompt and completion. Its trainer only
    prepares the row here: the tiny llama (not Gemma's vocabulary) never runs."""
    pytest.importorskip("trl", minversion="1.16")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    args = SFTConfig(output_dir=str(out), max_length=64, report_to="none", use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": text[:start], "completion": text[start:]}]))
    return trainer.train_dataset[0]["labels"]


@pytest.fixture(scope="module")
def lora_run(gemma_dir, tmp_path_factory):
    """The shipped Gemma preset, shrunk: 2 LoRA steps with the CPU kernels, the test split
    against the base."""
    class Said(Callback):
        def on_train_begin(self, info):
            self.kernels = info.get("kernels", "")

    said = Said()
    cfg = load_preset("gemma3-sentiment").with_overrides(SMALL | {
        "train.output_dir": str(tmp_path_factory.mktemp("gemma") / "run"), "eval.max_test_rows": 6,
        "eval.num_samples": 1, "eval.max_new_tokens": 2})
    return run(cfg, callbacks=[said], progress=lambda m: None), said.kernels


def test_lora_run_with_kernels_evaluates_against_the_base(lora_run):
    session, kernels = lora_run
    assert "fused loss" in kernels and "attention for rows up to" in kernels and "LoRA layers (" in kernels
    history = session.train_result.history
    assert session.train_result.global_step == 2 and history["train_loss"].dropna().map(float).gt(0).all()
    assert list(session.eval_result.metrics.index)[:2] == ["tuned", "base"]
    assert (session.output_dir / "adapter" / "adapter_model.safetensors").is_file()


def plain_logprob(model, tokenizer, sentence: str) -> float:
    """log P(sentence | <bos>), written out with the model's own logits."""
    body = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([[tokenizer.bos_token_id] + body])).logits[0, :-1].float()
    return float(torch.log_softmax(logits, -1)[torch.arange(len(body)), torch.tensor(body)].sum())


def test_crows_pairs_scores_equal_an_independent_recomputation(gemma_dir, gemma_tokenizer):
    """Three CrowS-Pairs pairs scored by the probe (batched, padded) on Gemma with a LoRA
    adapter (B drawn at random, so it changes the scores) and on the base (adapter off), and
    each sentence recomputed alone, without padding or batching, from the model's logits."""
    from nb_finetune import modeling
    from nb_finetune.probes import runner
    from nb_finetune.probes.pairs import PairSet
    mcfg = config.ModelConfig(name=str(gemma_dir), target_modules="q_proj,v_proj")
    model = modeling.add_lora(modeling.load_base(mcfg, "completion", progress=lambda m: None), mcfg, "completion")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model.eval()
    pairs = runner.load_pair_set("crows-pairs-masked", limit=10, seed=0)
    pairs = PairSet(pairs.name, pairs.items.head(3))
    result = runner.pair_probe(runner.ProbeTarget(model, gemma_tokenizer), pairs, progress=lambda m: None)
    moved = result["tuned"].scores["more_logprob"] - result["base"].scores["more_logprob"]
    assert moved.abs().min() > 1e-3  # the adapter changes the scores, so the base is told apart
    for which in ("tuned", "base"):
        with model.disable_adapter() if which == "base" else torch.no_grad():
            for row in result[which].scores.itertuples():
                assert row.more_logprob == pytest.approx(plain_logprob(model, gemma_tokenizer, row.more), abs=2e-3)
                assert row.less_logprob == pytest.approx(plain_logprob(model, gemma_tokenizer, row.less), abs=2e-3)


def test_qlora_trains_a_4bit_gemma_on_a_cpu(gemma_dir, sst2_frame, tmp_path):
    """bitsandbytes 4-bit nf4 base on the CPU, LoRA on top: a step trains, the adapter is saved."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    cfg = load_preset("gemma3-sentiment").with_overrides(SMALL | {
        "data.text_column": "sentence", "model.quantization": "4bit", "train.max_steps": 1, "train.batch_size": 2,
        "train.max_length": 48, "train.output_dir": str(tmp_path / "q")})
    session = Session(cfg, progress=lambda m: None)
    session.prepare_data(sst2_frame)
    session.load_model()
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in session.model.modules()) >= 18 * 7
    result = session.train()
    assert result.global_step == 1 and result.history["train_loss"].dropna().map(float).gt(0).all()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


MEMORY = textwrap.dedent("""
    import json, sys
    import psutil
    from nb_finetune import load_preset
    from nb_finetune.pipeline import Session
    cfg = load_preset("gemma3-sentiment").with_overrides({"train.max_steps": 2, "train.eval_steps": 100,
        "train.batch_size": 4, "train.max_length": 128, "train.output_dir": sys.argv[1]})
    s = Session(cfg, progress=lambda m: None)
    s.prepare_data(); s.tokenize(); s.load_model()
    s.train()
    print(json.dumps({"estimate": s.memory_estimate.total, "parts": s.memory_estimate.parts, "peak": s.peak_memory}))
""")


def test_memory_estimate_is_close_to_the_measured_peak(tmp_path):
    """Gemma 3 270M, batch 4 x 128 tokens, in a fresh process (peak memory is per process). On a
    CPU the peak is the process's resident high-water mark, which moves from run to run of the
    same code (weights mapped from the file as they are first touched, memory the allocator
    keeps), by more than a 0.8 lower bound allowed: a clean-clone suite run failed just under
    it, and repeated runs of this script spread across it. Hence 0.7."""
    proc = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path / "run")], capture_output=True, text=True,
                          env=SUBPROCESS_ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.7 < got["estimate"] / got["peak"] < 1.2, got
