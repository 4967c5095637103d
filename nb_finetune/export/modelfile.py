"""An Ollama Modelfile for an exported GGUF: the chat template turned into Ollama's Go template,
the end-of-turn tokens as stop parameters, and the template's default system prompt.

The Go template is not translated from the Jinja source (any Jinja can appear there): the
tokenizer's template is rendered with marker contents, and the text around each marker is
what a system, user or assistant turn looks like.
"""
from __future__ import annotations

import json

from ..errors import UserError

_MARK = "\u2063MARK{}\u2063"


def _render(tokenizer, roles: list[str], generation: bool = False) -> str:
    messages = [{"role": r, "content": _MARK.format(i)} for i, r in enumerate(roles)]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def turns(tokenizer) -> dict[str, str]:
    """The text before and after a turn of each role, the generation prompt and the default system
    prompt that the template adds when the conversation has none ('' if it adds none)."""
    system = _render(tokenizer, ["system"])
    sys_pre, sys_post = system.split(_MARK.format(0))
    with_user = _render(tokenizer, ["system", "user"])
    user_pre, user_post = with_user[len(system):].split(_MARK.format(1))
    with_gen = _render(tokenizer, ["system", "user"], generation=True)
    full = _render(tokenizer, ["system", "user", "assistant"])
    asst_pre, asst_post = full[len(with_user):].split(_MARK.format(2))
    gen = with_gen[len(with_user):]
    head = _render(tokenizer, ["user"]).split(user_pre + _MARK.format(0))[0]
    default = head[len(sys_pre):-len(sys_post)] if head.startswith(sys_pre) and head.endswith(sys_post) and head else ""
    return {"sys_pre": sys_pre, "sys_post": sys_post, "user_pre": user_pre, "user_post": user_post,
            "gen": gen, "asst_post": asst_post, "default_system": default}


def go_template(t: dict[str, str]) -> str:
    """Ollama's single-turn form (.System, .Prompt, .Response); Ollama repeats it for each turn."""
    return ("{{ if .System }}" + t["sys_pre"] + "{{ .System }}" + t["sys_post"] + "{{ end }}"
            "{{ if .Prompt }}" + t["user_pre"] + "{{ .Prompt }}" + t["user_post"] + "{{ end }}"
            + t["gen"] + "{{ .Response }}" + t["asst_post"])


def stop_tokens(tokenizer, t: dict[str, str]) -> list[str]:
    """The end-of-turn text (what closes an assistant turn) and the EOS token."""
    stops = [s for s in (t["asst_post"].strip(), tokenizer.eos_token) if s]
    return list(dict.fromkeys(stops))


def plain_modelfile(tokenizer, gguf_name: str, context: int) -> str:
    """A model without a chat template (a base model): Ollama passes the prompt as it is."""
    lines = [f"FROM ./{gguf_name}", "", 'TEMPLATE """{{ .Prompt }}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(tokenizer.eos_token)}"] if tokenizer.eos_token else []
    lines += ["PARAMETER temperature 0.7", "PARAMETER top_p 0.9", f"PARAMETER num_ctx {context}", ""]
    return "\n".join(lines)


def modelfile(tokenizer, gguf_name: str = "model.gguf", context: int = 4096, chat: bool = True) -> str:
    """The Modelfile for the chat template (turns and stop tokens), or a plain one where the
    tokenizer has none or `chat` is False."""
    if not chat or not tokenizer.chat_template:
        return plain_modelfile(tokenizer, gguf_name, context)
    try:
        t = turns(tokenizer)
    except (ValueError, TypeError) as err:
        raise UserError(f"the chat template cannot be turned into an Ollama template ({err}); "
                        "write the Modelfile's TEMPLATE by hand") from err
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{go_template(t)}"""', ""]
    if t["default_system"]:
        lines += [f'SYSTEM """{t["default_system"]}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop_tokens(tokenizer, t)]
    lines += ["PARAMETER temperature 0.7", "PARAMETER top_p 0.9", f"PARAMETER num_ctx {context}", ""]
    return "\n".join(lines)
