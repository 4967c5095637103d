"""Tokenization with completion-only loss, and the collator that pads batches.

How the trained tokens are found: each row is rendered to one string, and the character
spans of the response(s) in it are known exactly (we put them there). The fast tokenizer's
offset mapping then marks every token that overlaps a response span as trained. So the
boundary never depends on a response template tokenizing the same alone and in context,
which is where TRL's `DataCollatorForCompletionOnlyLM` went wrong.

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

import bisect
import hashlib
import itertools
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import frame_digest
from .errors import UserError

IGNORE = -100  # label value that the loss skips
TOKEN_CACHE_BYTES = 2 * 2**30  # the token cache keeps its most recently used entries up to this size
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

    def encode_classification(self, row, label_ids: dict) -> dict:
        """For a classification head: the text's ids (middle cut) and the class index."""
        return self.encode_classification_many([row], label_ids)[0]

    def encode_classification_many(self, rows, label_ids: dict, progress=None) -> list[dict]:
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


@dataclass
class TokenizationStats:
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_no_trained: int = 0
    lengths: list = field(default_factory=list, repr=False)

    def summary(self, max_length: int) -> str:
        lengths = np.asarray(self.lengths or [0])
        return (f"{self.rows:,} rows, {self.tokens:,} tokens ({self.trained_tokens:,} trained), length median "
                f"{np.median(lengths):.0f} / 95th percentile {np.percentile(lengths, 95):.0f} / max {lengths.max()}; "
                f"max_length {max_length}: {self.prompt_truncated} prompts cut in the middle, "
                f"{self.response_truncated} responses cut, {self.dropped_no_trained} rows dropped "
                "with no trained token left")


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        f = self.features[i]
        item = {"input_ids": f["input_ids"], "labels": f["labels"]}
        if "position_ids" in f:  # a packed row
            item["position_ids"] = f["position_ids"]
        return item


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of rows grouped so that each group holds at most max_length tokens.

    Best fit, longest rows first: each row goes into the fullest group it still fits in. Kept
    in a list sorted by free space, so a data set of 100k rows packs in about a second."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, group index), ascending
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            groups.append([i])
            bisect.insort(free, (max_length - n, len(groups) - 1))
        else:
            room, g = free.pop(at)
            groups[g].append(i)
            bisect.insort(free, (room - n, g))
    return groups


PACKING_NEEDS_CAUSAL_LM = ("train.packing needs a causal-LM objective: a classification head sees one row per "
                           "input; set train.packing to false")


def pack(dataset: TokenizedDataset, max_length: int) -> TokenizedDataset:
    """Several short rows in one row of at most max_length tokens, none attending to another.

    Each packed row carries position_ids that restart at 0 for every original row. Given
    position_ids and no attention mask, transformers builds a block-diagonal causal mask from
    them, so each original row sees only itself, at its own positions: the same logits as
    unpacked (tests/test_speed.py); the engine's trainer passes packed batches that way. Each
    original row's first label is not trained: it would be predicted from the row before."""
    features = dataset.features
    if features and isinstance(features[0]["labels"], (int, np.integer)):
        raise UserError(PACKING_NEEDS_CAUSAL_LM)
    packed = []
    for group in pack_rows([len(f["input_ids"]) for f in features], max_length):
        input_ids, labels, positions = [], [], []
        for i in group:
            ids = features[i]["input_ids"]
            input_ids += ids
            labels += [IGNORE] + list(features[i]["labels"][1:])
            positions += range(len(ids))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": positions})
    return TokenizedDataset(packed)


def tokenize_frame(frame: pd.DataFrame, fmt: Formatter, head_labels: dict | None = None,
                   cache: Path | None = None, progress=None) -> tuple[TokenizedDataset, TokenizationStats]:
    """Encode every row; rows with no trained token left are dropped and counted.

    With `cache` (a folder), the encoded rows are kept there and read back when the same rows
    are tokenized the same way again (see `_fingerprint`): a re-run, a restarted kernel, new
    LoRA or training settings on the same data."""
    stats = TokenizationStats()
    kept = []
    rows = frame.to_dict(orient="records")

    def encode():
        if head_labels:
            return fmt.encode_classification_many(rows, head_labels, progress)
        return fmt.encode_many(rows, progress)

    encoded = _cached(cache, frame, fmt, head_labels, encode, progress) if cache and rows else encode()
    for f in encoded:
        stats.rows += 1
        stats.lengths.append(len(f["input_ids"]))
        stats.prompt_truncated += f["prompt_truncated"]
        stats.response_truncated += f["response_truncated"]
        if head_labels:
            trained = 1
        else:
            trained = sum(1 for x in f["labels"] if x != IGNORE)
        if trained == 0:
            stats.dropped_no_trained += 1
            continue
        stats.tokens += len(f["input_ids"])
        stats.trained_tokens += trained
        kept.append(f)
    return TokenizedDataset(kept), stats


def _fingerprint(frame: pd.DataFrame, fmt: Formatter, head_labels: dict | None) -> str:
    """Everything a split's tokens depend on: this module's code (a change to how rows are
    encoded makes every entry stale), the tokenizer's whole definition (vocabulary, merges,
    normalizer, pre- and post-processing, added tokens) and its chat template and special
    tokens, the formatter's settings, the class indices of a head, and every row's values."""
    tok = fmt.tokenizer
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(tok.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([type(tok).__name__, getattr(tok, "chat_template", None), tok.special_tokens_map,
                              sorted(tok.all_special_ids), fmt.max_length, fmt.use_chat, fmt.instruction,
                              fmt.labels, head_labels], default=str, sort_keys=True).encode())
    digest.update(frame_digest(frame).encode())
    return digest.hexdigest()[:40]


def _cached(folder: Path, frame: pd.DataFrame, fmt: Formatter, head_labels: dict | None, encode, progress=None
            ) -> list[dict]:
    """encode(), or the rows it encoded the last time it was asked for the same fingerprint.
    A missing, unreadable or damaged entry is encoded again; a folder that cannot be written
    costs only that."""
    path = Path(folder) / f"{_fingerprint(frame, fmt, head_labels)}.npz"
    try:
        encoded = _load_encoded(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # not there, or damaged (a write cut short by a full disk, say): encode again and replace it
    else:
        try:
            os.utime(path)  # used now: eviction removes the least recently used first
        except OSError:
            pass  # a cache someone else owns: read it all the same
        if progress:
            progress(f"tokens of {len(encoded):,} rows read from the cache ({path.parent})")
        return encoded
    encoded = encode()
    try:
        _save_encoded(path, encoded)
        _evict(path.parent, TOKEN_CACHE_BYTES)
    except OSError:
        pass
    return encoded


def _save_encoded(path: Path, encoded: list[dict]) -> None:
    """The rows as flat int32 arrays with their lengths (numpy's npz: no pickle when read back),
    written to a temporary file and renamed, so a reader never sees half an entry. One larger
    than the whole cache is not written: eviction would remove it at once."""
    lengths = np.fromiter((len(f["input_ids"]) for f in encoded), np.int64, len(encoded))
    total = int(lengths.sum())
    if total * 8 > TOKEN_CACHE_BYTES:
        return
    ids = np.fromiter(itertools.chain.from_iterable(f["input_ids"] for f in encoded), np.int32, total)
    per_row = not isinstance(encoded[0]["labels"], list)  # a head's class index, one per row
    labels = (np.array([f["labels"] for f in encoded], np.int64) if per_row else
              np.fromiter(itertools.chain.from_iterable(f["labels"] for f in encoded), np.int32, total))
    flags = np.array([(f["prompt_truncated"], f["response_truncated"]) for f in encoded], bool)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=ids, labels=labels, lengths=lengths, flags=flags, per_row=per_row)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_encoded(path: Path) -> list[dict]:
    with np.load(path) as entry:
        ids, labels, lengths, flags = entry["ids"], entry["labels"], entry["lengths"], entry["flags"]
        per_row = bool(entry["per_row"])
    if int(lengths.sum()) != len(ids) or len(flags) != len(lengths) or \
            len(labels) != (len(lengths) if per_row else len(ids)):
        raise ValueError(f"{path}: inconsistent token cache entry")
    bounds = np.cumsum(lengths)[:-1]
    row_labels = labels.tolist() if per_row else [part.tolist() for part in np.split(labels, bounds)]
    return [{"input_ids": part.tolist(), "labels": lab, "prompt_truncated": bool(cut), "response_truncated": bool(lost)}
            for part, lab, (cut, lost) in zip(np.split(ids, bounds), row_labels, flags)]


def _evict(folder: Path, limit: int) -> None:
    """Remove the least recently used entries beyond `limit` bytes, and temporary files a
    crashed writer left a day ago or more."""
    entries = []
    for p in folder.iterdir():
        try:
            st = p.stat()
        except FileNotFoundError:  # another process removed it
            continue
        if p.suffix == ".tmp" and time.time() - st.st_mtime > 86400:
            p.unlink(missing_ok=True)
        elif p.suffix == ".npz":
            entries.append((st.st_mtime, st.st_size, p))
    kept = 0
    for _, size, p in sorted(entries, reverse=True):
        kept += size
        if kept > limit:
            p.unlink(missing_ok=True)


@dataclass
class CompletionOnlyCollator:
    """Pads a batch dynamically (to its longest row, rounded up to `pad_to_multiple_of`).

    Labels arrive already masked by `Formatter.encode` (prompt = -100); padding gets -100
    by position. Causal-LM only (mlm=False). Sequence-classification rows (int labels) pass
    through with their class index.
    """
    pad_token_id: int
    pad_to_multiple_of: int | None = 8
    label_pad_token_id: int = IGNORE
    return_tensors: str = "pt"
    mlm: bool = False
    padding_side: str = "right"

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        width = -(-longest // m) * m if m else longest  # ceil to a multiple of m
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        per_token = not isinstance(features[0]["labels"], (int, np.integer))
        labels = torch.full((n, width), self.label_pad_token_id, dtype=torch.long) if per_token else \
            torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        packed = "position_ids" in features[0]
        if packed:
            # Padding restarts at position 0: a sequence of its own that no real token attends to.
            positions = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            cols = slice(0, k) if self.padding_side == "right" else slice(width - k, width)
            input_ids[i, cols] = torch.as_tensor(f["input_ids"])
            attention[i, cols] = 1
            if per_token:
                labels[i, cols] = torch.as_tensor(f["labels"])
            if packed:
                pads = slice(k, width) if self.padding_side == "right" else slice(0, width - k)
                positions[i, cols] = torch.as_tensor(f["position_ids"])
                positions[i, pads] = torch.arange(width - k)
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if packed:
            # attention_mask still counts the real tokens; the model must get position_ids
            # without it (engine's trainer), or the packed rows would see each other.
            batch["position_ids"] = positions
        return batch


# -- preview: what one row and one batch look like ----------------------------------------

def token_table(fmt: Formatter, row, pad_to: int = 0) -> pd.DataFrame:
    """One row's tokens after encoding and collating: id, text, role and the label the loss sees.

    role: 'response' (trained), 'prompt' (not trained), 'special' (a special token not trained)
    or 'padding' (added by the collator up to `pad_to` tokens)."""
    f = fmt.encode(row)
    ids, labels = f["input_ids"], f["labels"]
    special = set(fmt.tokenizer.all_special_ids)
    pad_id = fmt.tokenizer.pad_token_id
    pad = max(0, pad_to - len(ids))
    rows = [{"id": i, "token": fmt.tokenizer.decode([i]), "label": lab,
             "role": "response" if lab != IGNORE else "special" if i in special else "prompt"}
            for i, lab in zip(ids, labels)]
    rows += [{"id": pad_id, "token": fmt.tokenizer.decode([pad_id]), "label": IGNORE, "role": "padding"}] * pad
    out = pd.DataFrame(rows, columns=["id", "token", "label", "role"])
    out.attrs.update(prompt_truncated=f["prompt_truncated"], response_truncated=f["response_truncated"])
    return out


def batch_padding(lengths: list[int], batch_size: int, pad_to_multiple_of: int = 0) -> dict:
    """Padding share when rows of these lengths are batched in order, with and without rounding
    each batch's width up to a multiple (e.g. 8: widths 13 and 21 become 16 and 24)."""
    def padded(multiple: int) -> int:
        total = 0
        for start in range(0, len(lengths), batch_size):
            chunk = lengths[start:start + batch_size]
            width = max(chunk)
            if multiple:
                width = -(-width // multiple) * multiple
            total += width * len(chunk)
        return total

    real = sum(lengths)
    plain, rounded = padded(0), padded(pad_to_multiple_of)
    return {"rows": len(lengths), "tokens": real, "padding_share": 1 - real / plain if plain else 0.0,
            "padding_share_rounded": 1 - real / rounded if rounded else 0.0,
            "extra_tokens_from_rounding": rounded - plain}
