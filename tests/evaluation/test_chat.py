"""The chat playground's stream: with the chat template, greedy pieces join into exactly what
generate() writes, for the tuned model and for its base (adapter off), it ends at end-of-turn,
and a stop flag ends it early."""
import threading

import pytest
import torch

from nb_finetune.evaluation import Sampling, stream_reply

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def tuned(smollm2_dir):
    """SmolLM2 with a random LoRA adapter, so that base and tuned answers differ."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, lora).eval()


def greedy_text(model, tokenizer, max_new_tokens):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.mark.slow
def test_streamed_greedy_matches_generate_for_tuned_and_base(tuned, tokenizer):
    greedy = Sampling(temperature=0.0, max_new_tokens=64)
    pieces = list(stream_reply(tuned, tokenizer, QUESTION, True, greedy))
    expected, _ = greedy_text(tuned, tokenizer, 64)
    assert len(pieces) > 1 and "".join(pieces) == expected
    with tuned.disable_adapter():
        base_expected, n = greedy_text(tuned, tokenizer, 64)
    base = "".join(stream_reply(tuned, tokenizer, QUESTION, False, greedy))
    assert base == base_expected and base != expected
    assert n < 64 and "Paris" in base  # the instruct base answers and ends its turn


def test_stop_flag_ends_the_stream(tuned, tokenizer):
    stop = threading.Event()
    stop.set()
    text = "".join(stream_reply(tuned, tokenizer, QUESTION, True, Sampling(max_new_tokens=64), stop))
    assert len(tokenizer(text)["input_ids"]) <= 2


def test_a_reader_that_goes_away_stops_generation(tuned, tokenizer):
    """An interrupt of the cell (Colab's Stop) closes the stream: generate() is told to stop too."""
    stop = threading.Event()
    stream = stream_reply(tuned, tokenizer, QUESTION, True, Sampling(temperature=0.0, max_new_tokens=256), stop)
    next(stream)
    stream.close()
    assert stop.is_set()
