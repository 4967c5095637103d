"""Export a run: the adapter, a merged model, a GGUF file for llama.cpp / Ollama (gguf_export),
or a job folder for an existing launcher (job)."""
from .adapter import merge, save_adapter, save_merged
from .gguf_export import GGUFExport, export_gguf
from .job import export_job

__all__ = ["GGUFExport", "export_gguf", "export_job", "merge", "save_adapter", "save_merged"]
