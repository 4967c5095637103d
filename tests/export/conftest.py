"""Fixtures the export tests share."""
from pathlib import Path

import pytest

GEMMA_TOKENIZER = Path.home() / ".cache" / "nb_finetune" / "models" / "gemma3-270m"


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """Gemma 3's SentencePiece-style tokenizer (BPE with byte fallback), from the built-in
    gemma3-270m asset's cache folder."""
    if not (GEMMA_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("the gemma3-270m asset is not in the cache")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(GEMMA_TOKENIZER)
