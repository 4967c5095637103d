"""Formatting with completion-only loss: each row rendered to one string, tokenized, and its
trained tokens marked.

How the trained tokens are found: the character spans of the response(s) in the rendered
string are known exactly (we put them there). The fast tokenizer's offset mapping then marks
every token that overlaps a response span as trained. So the boundary never depends on a
response template tokenizing the same alone and in context, which is where trl 0.19's
`DataCollatorForCompletionOnlyLM` went wrong.

Other rules, each a failure mode of that collator:
- the end of each response (the chat template's end-of-turn token, else EOS appended) is
  trained, and padding is told apart by position, never by `token == pad_token_id`, so EOS
  is trained even when the pad token equals it;
- every assistant turn of a multi-turn chat is trained;
- an over-long row loses the middle of its prompt first; the response is cut only when it
  alone does not fit, and rows left with no trained token are counted and dropped, with
  the count reported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError

IGNORE = -100  # label value that the loss skips
CHUNK_ROWS = 1024  # rows per tokenizer call: bounded memory for large data sets, progress between calls


@dataclass
class Formatter:
    """Turns normalised rows into token ids and labels for one tokenizer and task."""
    tokenizer: object
    max_length: int = 256
    use_chat: bool = True
    instruction: str = ""          # put before the text of a classification row
    labels: list = field(default_factory=list)

    @classmethod
    def build(cls, tokenizer, task: str, labels: list[str], max_length: int, chat_template: str = "auto",
              instruction: str = "") -> "Formatter":
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template == "yes" and not has_template:
            raise UserError("model.chat_template='yes' but this tokenizer has no chat template; "
                            "set it to 'no' or 'auto'")
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("completion-only loss needs a fast tokenizer (offset mapping); "
                            "this model's tokenizer is a slow one")
        use_chat = has_template and chat_template != "no"
        if task == "classification" and not instruction:
            instruction = ("Classify the text as one of: " + ", ".join(labels) + ". Answer with the label only.")
        return cls(tokenizer, max_length, use_chat, instruction, list(labels))

    # -- rendering ---------------------------------------------------------------------
    def messages(self, row) -> list[dict]:
        """The chat for a row: its messages, or one user turn and one assistant turn."""
        if "messages" in row and row["messages"] is not None and not isinstance(row["messages"], float):
            msgs = list(row["messages"])
        else:
            msgs = [{"role": "user", "content": self.prompt_text(row)},
                    {"role": "assistant", "content": self.response_text(row)}]
        # An answer's leading whitespace is dropped: after the template's "assistant\n" it can
        # merge with that newline into one token ("\n "), one that generation, starting after
        # the newline, never produces.
        return [m | {"content": str(m["content"]).lstrip()} if m["role"] == "assistant" else m for m in msgs]

    def prompt_text(self, row) -> str:
        if "text" in row:
            if self.use_chat:
                return f"{self.instruction}\n\n{row['text']}"
            return f"{self.instruction}\n\nText: {row['text']}\nAnswer:"
        return row["prompt"]

    def response_text(self, row) -> str:
        return row["label"] if "label" in row else row["completion"]

    def render(self, row) -> tuple[str, list[tuple[int, int]]]:
        """The full training string and the character spans of its responses."""
        if self.use_chat:
            msgs = self.messages(row)
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False)
            return text, _locate_responses(text, msgs, self.tokenizer)
        prompt, response = self.prompt_text(row), self.response_text(row)
        # The separator belongs to the response: generation starts right after the prompt, so
        # a lone " " token (before a digit, say) must be trained too. A prompt's own trailing
        # whitespace is that separator: left on the prompt it tokenizes alone as " " but merges
        # with the response in context (" :"), and generation would start from other tokens.
        head = prompt.rstrip()
        sep = prompt[len(head):] or ("" if response[:1].isspace() else " ")
        return head + sep + response, [(len(head), len(head) + len(sep) + len(response))]

    def prompt_ids(self, row) -> list[int]:
        """Token ids of the prompt alone, as generation starts from it."""
        if self.use_chat:
            msgs = self.messages(row)
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            text = self.tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(self.prompt_text(row).rstrip())["input_ids"]  # see render
        return _cut_middle(ids, self.max_length)

    # -- encoding ----------------------------------------------------------------------
    def encode(self, row) -> dict:
        """{"input_ids", "labels"} plus flags saying what truncation did."""
        return self.encode_many([row])[0]

    def encode_many(self, rows, progress=None) -> list[dict]:
        """`encode` for many rows, with one batched tokenizer call (the fast tokenizer works
        through a batch in Rust, several times quicker than one call per row)."""
        special = set(self.tokenizer.all_special_ids)
        out = []
        for chunk in _chunks(rows, progress):
            rendered = [self.render(row) for row in chunk]
            enc = self.tokenizer([text for text, _ in rendered], add_special_tokens=not self.use_chat,
                                 return_offsets_mapping=True)
            out += [self._label(ids, offsets, spans, special)
                    for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered)]
        return out

    def _label(self, ids, offsets, spans, special: set) -> dict:
        ids = list(ids)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        trained = np.zeros(len(ids), bool)
        for a, b in spans:  # a token overlapping a response's characters is trained
            trained |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
        # Train the token that closes each response (e.g. <|im_end|>) so the model learns to stop.
        ends = np.flatnonzero(trained[:-1] & ~trained[1:]) + 1
        for i in ends:
            if ids[i] in special:
                trained[i] = True
        eos = self.tokenizer.eos_token_id
        if trained.size and trained[-1] and ids[-1] not in special and eos is not None:
            ids.append(eos)
            trained = np.append(trained, True)
        if not trained.any():
            raise UserError("the response could not be located in the rendered row; check the chat template "
                            "(model.chat_template='no' uses plain text)")
        labels = np.where(trained, ids, IGNORE)
        return self._truncate(np.asarray(ids), labels)

    def _truncate(self, ids: np.ndarray, labels: np.ndarray) -> dict:
        n, limit = len(ids), self.max_length
        flags = {"prompt_truncated": False, "response_truncated": False}
        if n > limit:
            trained = labels != IGNORE
            first = int(np.argmax(trained))
            runs = int(trained[0]) + int((trained[1:] & ~trained[:-1]).sum())
            if runs == 1:  # one response: shorten the prompt before it
                keep_prompt = max(min(first, 8), first - (n - limit))
                if keep_prompt < first:
                    head = keep_prompt // 3
                    drop = slice(head, first - (keep_prompt - head))
                    ids, labels = np.delete(ids, drop), np.delete(labels, drop)
                    flags["prompt_truncated"] = True
            if len(ids) > limit:
                flags["response_truncated"] = bool((labels[limit:] != IGNORE).any())
                ids, labels = ids[:limit], labels[:limit]
        return {"input_ids": ids.tolist(), "labels": labels.tolist(), **flags}

    def encode_classification_many(self, rows, label_ids: dict, progress=None) -> list[dict]:
        """For a classification head: each text's ids (middle cut) and its class index."""
        out = []
        for chunk in _chunks(rows, progress):
            for row, ids in zip(chunk, self.tokenizer([row["text"] for row in chunk])["input_ids"]):
                out.append({"input_ids": _cut_middle(ids, self.max_length), "labels": label_ids[row["label"]],
                            "prompt_truncated": len(ids) > self.max_length, "response_truncated": False})
        return out


def _chunks(rows: list, progress=None, every: float = 5.0):
    """Rows CHUNK_ROWS at a time, saying how far it got every few seconds on long work."""
    last = time.monotonic()
    for start in range(0, len(rows), CHUNK_ROWS):
        yield rows[start:start + CHUNK_ROWS]
        if progress and time.monotonic() - last > every and start + CHUNK_ROWS < len(rows):
            progress(f"tokenizing: {start + CHUNK_ROWS:,} of {len(rows):,} rows")
            last = time.monotonic()


def _locate_responses(text: str, messages: list[dict], tokenizer) -> list[tuple[int, int]]:
    """Character spans of the assistant contents in a rendered chat, found in order.

    An assistant turn is looked for after the chat rendered up to it (with the generation
    prompt) where that is a prefix of the whole: searching from the previous message alone, a
    short content ("l") can match inside the template's own text (a default system prompt's
    "helpful")."""
    spans, pos = [], 0
    for i, m in enumerate(messages):
        content = str(m["content"])
        if m["role"] == "assistant" and i:
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if text.startswith(before):
                pos = max(pos, len(before))
        idx = text.find(content, pos)
        if idx < 0:  # some templates strip the content
            content = content.strip()
            idx = text.find(content, pos)
        if idx < 0:
            raise UserError(f"the chat template changed a {m['role']} message so it cannot be found in the "
                            "rendered text; set model.chat_template='no' to train on plain text")
        if m["role"] == "assistant" and content:
            spans.append((idx, idx + len(content)))
        pos = idx + len(content)
    return spans


def _cut_middle(ids: list[int], limit: int) -> list[int]:
    if len(ids) <= limit:
        return list(ids)
    head = limit // 3
    return list(ids[:head]) + list(ids[len(ids) - (limit - head):])
