"""The tokenizer inside a GGUF file, in either of llama.cpp's two kinds: byte-level BPE ("gpt2":
tokens, merges, the pre-tokenizer's name) and SentencePiece-style BPE with byte fallback ("llama":
tokens, scores, token types, as Gemma and Llama 2 use), with special ids and the chat template."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UserError


def vocabulary_kind(tokenizer) -> str:
    """"gpt2" or "llama", from the fast tokenizer's model; anything else is refused."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"] if getattr(tokenizer, "is_fast", False) else {}
    if model.get("type") == "BPE":
        return "llama" if model.get("byte_fallback") else "gpt2"
    raise UserError("GGUF export: not supported yet: a tokenizer that is neither byte-level BPE nor "
                    "SentencePiece-style BPE with byte fallback")


def pre_tokenizer(config, tokenizer) -> str:
    """llama.cpp's name for the regex that splits text before BPE (it refuses names it does not know)."""
    vocab = tokenizer.get_vocab()
    if config.model_type in ("qwen2", "qwen3") and "<|im_start|>" in vocab and len(tokenizer) > 150000:
        return "qwen2"
    if "<|begin_of_text|>" in vocab:
        return "llama-bpe"
    if "<|im_start|>" in vocab and len(tokenizer) == 49152:
        return "smollm"
    return "default"


def token_table(tokenizer, vocab_size: int, kind: str = "gpt2") -> tuple[list[str], list[int]]:
    """Tokens in id order with llama.cpp's types (normal, byte for <0xNN> pieces of a SentencePiece
    vocabulary, control for special added tokens, user-defined for other added ones), padded to
    the model's vocabulary size."""
    from gguf import TokenType
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.USER_DEFINED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            byte = kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", reverse[i])
            types.append(TokenType.BYTE if byte else TokenType.NORMAL)
    return tokens, types


def merge_scores(tokenizer, tokens: list[str]) -> list[float]:
    """SentencePiece scores for llama.cpp, which merges the pair whose result scores highest: the
    earlier a merge comes in the BPE list, the higher its result scores (minus its rank); tokens no
    merge makes score 0, and padding -1000 as llama.cpp's converter writes for unused pieces."""
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(a + b, i)
    return [-1000.0 if t.startswith("[PAD") else -float(rank[t] + 1) if t in rank else 0.0 for t in tokens]


def space_prefix(tokenizer) -> bool:
    """Whether the normalizer puts "▁" before the text (Llama 2 does, Gemma does not)."""
    return '"Prepend"' in json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("normalizer"))


def add_tokenizer(writer, config, tokenizer, model_dir: Path, chat_template: bool | None = None) -> None:
    """Tokens, merges or scores, special ids and the chat template (where the tokenizer has one;
    `chat_template=True` refuses a tokenizer without, False leaves it out). The end-of-sequence
    token must survive, or the exported model never stops talking."""
    import gguf
    kind = vocabulary_kind(tokenizer)
    check_chat_template(tokenizer, chat_template)
    if tokenizer.eos_token_id is None:
        raise UserError("GGUF export: the tokenizer has no end-of-sequence token; save the base's tokenizer "
                        "with the adapter")
    tokens, types = token_table(tokenizer, config.vocab_size, kind)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre_tokenizer(config, tokenizer) if kind == "gpt2" else "default")
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(merge_scores(tokenizer, tokens))
        writer.add_add_space_prefix(space_prefix(tokenizer))
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=len(tokens))
    if chat_template is False or not tokenizer.chat_template:
        special.chat_template = None
    special.add_to_gguf(writer, quiet=True)


def check_chat_template(tokenizer, chat_template: bool | None) -> None:
    if chat_template and not tokenizer.chat_template:
        raise UserError("GGUF export: a chat template was asked for, but the tokenizer has none (a base "
                        "model): export without one (chat_template: no), or use the instruct model's tokenizer")
