"""A chat reply streamed piece by piece, from the tuned model or from its base (adapter off),
with the tokenizer's chat template applied, and a stop flag honoured between tokens."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from .base_cache import as_base


@dataclass
class Sampling:
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    max_new_tokens: int = 128


def chat_inputs(tokenizer, message: str):
    """The message as one user turn, with the generation prompt (plain text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
    return tokenizer(message, return_tensors="pt")


def generate_kwargs(model, tokenizer, message: str, sampling: Sampling, streamer, stop: threading.Event) -> dict:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopFlag(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    inputs = {k: v.to(model.device) for k, v in chat_inputs(tokenizer, message).items()}
    sample = sampling.temperature > 0
    return dict(inputs, streamer=streamer, max_new_tokens=sampling.max_new_tokens, do_sample=sample,
                temperature=sampling.temperature if sample else None, top_p=sampling.top_p if sample else None,
                top_k=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([StopFlag()]))


def stream_reply(model, tokenizer, message: str, tuned: bool = True, sampling: Sampling | None = None,
                 stop: threading.Event | None = None) -> Iterator[str]:
    """Yields the reply's text as the model writes it. generate() runs on a helper thread that
    feeds transformers' TextIteratorStreamer; this generator reads from it."""
    from transformers import TextIteratorStreamer
    stop = stop or threading.Event()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = generate_kwargs(model, tokenizer, message, sampling or Sampling(), streamer, stop)
    errors = []

    def work():
        try:
            model.generate(**kwargs)
        except Exception as err:  # re-raised on the reading thread, where the panel shows it
            errors.append(err)
            streamer.end()

    with (contextlib.nullcontext() if tuned else as_base(model)):
        worker = threading.Thread(target=work, name="nb_finetune-chat", daemon=True)
        worker.start()
        try:
            yield from streamer
        except BaseException:  # an interrupt (Colab's Stop) or a reader gone: end generate() too
            stop.set()
            raise
        finally:
            worker.join()
    if errors:
        raise errors[0]
