"""Keep access tokens out of everything written: configs, reports, histories, messages."""
from __future__ import annotations

import os
import re

# Hugging Face tokens look like hf_ followed by 30+ letters and digits.
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")
_SECRET_NAMES = re.compile(r"(TOKEN|API_KEY|SECRET|PASSWORD)$")
MASK = "***"


def _secret_values() -> list[str]:
    """Values of environment variables named like secrets (HF_TOKEN, WANDB_API_KEY, ...)."""
    return sorted({v for k, v in os.environ.items() if _SECRET_NAMES.search(k.upper()) and len(v) >= 8},
                  key=len, reverse=True)


def redact(text: str) -> str:
    for value in _secret_values():
        text = text.replace(value, MASK)
    return _TOKEN_PATTERN.sub(MASK, text)
