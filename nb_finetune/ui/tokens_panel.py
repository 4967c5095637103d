"""Tokenization preview: one row's tokens coloured by role, with the labels the collator
produces, and what padding and truncation do to batches at the chosen settings. For preference
pairs: the shared prompt once, and the chosen and rejected answers' tokens side by side."""
from __future__ import annotations

import ipywidgets as widgets
import pandas as pd

from .. import modeling
from ..data.collator import batch_padding, pair_batch_stats, pair_token_tables, token_table
from ..data.formatter import Formatter
from ..data.tokens import pack_rows, side_rows
from ..render import tables
from .common import Form, Panel

KEYS = ["train.max_length", "train.batch_size", "train.pad_to_multiple_of", "train.packing", "model.chat_template",
        "train.cache_tokens"]
SAMPLE_ROWS = 256  # rows encoded for the batch statistics: enough for stable shares, fast to redo


class TokenizationPanel(Panel):
    """Which tokens are trained: changes to max length, batch size, padding or the chat template
    redraw the preview at once."""

    title = "Tokens"

    def __init__(self, shared=None, config=None, data=None, **kwargs):
        super().__init__(shared, config, data, **kwargs)
        self.forms = [Form(self.shared, KEYS)]
        self.row = widgets.BoundedIntText(value=0, min=0, max=0, description="row",
                                          style={"description_width": "150px"},
                                          layout=widgets.Layout(width="260px"))
        self.row.observe(lambda c: self._auto_refresh(), names="value")
        self.preview_button = self.button("Preview", self.refresh, "primary", "search")
        self.row_info = widgets.HTML()
        self.tokens = widgets.HTML()
        self.batch = widgets.HTML()
        self._tokenizers: dict = {}
        self.formatter = None  # the Formatter of the last preview, for use from code
        self._shown = False
        self.shared.observe(self._on_event)
        self.children = [self.forms[0].widget, widgets.HBox([self.row, self.preview_button]), self.status,
                         self.error, self.warnings, self.row_info, self.tokens, self.batch]

    def _on_event(self, event: str) -> None:
        if event in ("config", "data"):
            self._auto_refresh()

    def _auto_refresh(self) -> None:
        # Redraw on every change once the user has asked for a preview (not before: the first
        # one loads a tokenizer).
        if self._shown:
            self.run_action(None, self.refresh)

    def _tokenizer(self, cfg):
        key = (cfg.model.name, cfg.model.trust_remote_code)
        if key not in self._tokenizers:
            self._tokenizers[key] = modeling.load_tokenizer(cfg.model, self.say)
        return self._tokenizers[key]

    def refresh(self) -> None:
        cfg = self.shared.config()
        session = self.session()
        prep = session.prep or session.prepare_data()
        train = prep.splits["train"]
        self.row.max = len(train) - 1
        fmt = Formatter.build(self._tokenizer(cfg), prep.task, prep.labels, cfg.train.max_length,
                              cfg.model.chat_template, prep.config.instruction)
        self.formatter = fmt
        t = cfg.train
        i = min(self.row.value, len(train) - 1)
        if prep.task == "preference":
            return self.show_pair(fmt, train, i, t)
        # The batch the row would sit in (rows in order), and its padded width.
        batch = train.iloc[i - i % t.batch_size:][: t.batch_size].to_dict("records")
        lengths = [len(e["input_ids"]) for e in fmt.encode_many(batch)]
        width = max(lengths)
        if t.pad_to_multiple_of:
            width = -(-width // t.pad_to_multiple_of) * t.pad_to_multiple_of
        table = token_table(fmt, train.iloc[i].to_dict(), pad_to=width)
        counts = table["role"].value_counts()
        cut = [name for name in ("prompt", "response") if table.attrs[f"{name}_truncated"]]
        self.row_info.value = (f"<b>row {i}</b>: {len(table) - counts.get('padding', 0)} tokens, "
                               f"{counts.get('response', 0)} trained, {counts.get('padding', 0)} padding to the "
                               f"batch width {width}" + (f"; <b>{' and '.join(cut)} cut</b> to max_length "
                                                         f"{t.max_length}" if cut else ""))
        self.tokens.value = tables.tokens_html(table)
        self.batch.value = self._batch_stats(fmt, train, t)
        self.say(f"{'chat template' if fmt.use_chat else 'plain text'}, max_length {t.max_length}, "
                 f"batch size {t.batch_size}, pad to a multiple of {t.pad_to_multiple_of or 1}")
        self._shown = True

    def _batch_stats(self, fmt, train: pd.DataFrame, t) -> str:
        rows = train.head(SAMPLE_ROWS).to_dict("records")
        encoded = fmt.encode_many(rows)
        lengths = [len(e["input_ids"]) for e in encoded]
        stats = batch_padding(lengths, t.batch_size, t.pad_to_multiple_of)
        groups = pack_rows(lengths, t.max_length)
        packed = batch_padding([sum(lengths[i] for i in g) for g in groups], t.batch_size, t.pad_to_multiple_of)
        table = pd.DataFrame([
            {"measure": "rows sampled", "value": f"{stats['rows']:,}"},
            {"measure": "padding share of the batches (to the longest row)", "value": f"{stats['padding_share']:.1%}"},
            {"measure": f"padding share with pad_to_multiple_of {t.pad_to_multiple_of}",
             "value": f"{stats['padding_share_rounded']:.1%} (+{stats['extra_tokens_from_rounding']:,} tokens)"},
            {"measure": f"packed (train.packing{' on' if t.packing else ''}): {len(groups):,} rows of up to "
                        f"{t.max_length} tokens", "value": f"padding share {packed['padding_share_rounded']:.1%}"},
            {"measure": f"prompts cut in the middle at max_length {t.max_length}",
             "value": f"{sum(e['prompt_truncated'] for e in encoded):,}"},
            {"measure": "responses cut (trained tokens lost)",
             "value": f"{sum(e['response_truncated'] for e in encoded):,}"},
        ])
        return "<b>batches</b>" + tables.table_html(table)

    # -- preference pairs -------------------------------------------------------------------
    def show_pair(self, fmt, train: pd.DataFrame, i: int, t) -> None:
        """Pair `i`: the shared prompt (masked) once, each answer's trained tokens coloured, both
        padded to the width of the batch the pair sits in; then the pair batches' statistics."""
        start = i - i % t.batch_size
        batch = train.iloc[start:start + t.batch_size]
        sides = {side: fmt.encode_many(side_rows(batch, side).to_dict("records")) for side in ("chosen", "rejected")}
        width = max(len(e["input_ids"]) for rows in sides.values() for e in rows)
        if t.pad_to_multiple_of:
            width = -(-width // t.pad_to_multiple_of) * t.pad_to_multiple_of
        row = train.iloc[[i]]
        parts = pair_token_tables(fmt, side_rows(row, "chosen").iloc[0].to_dict(),
                                  side_rows(row, "rejected").iloc[0].to_dict(), pad_to=width)
        trained = {k: int((parts[k]["role"] == "response").sum()) for k in ("chosen", "rejected")}
        self.row_info.value = (f"<b>pair {i}</b>: a prompt of {len(parts['prompt'])} tokens shared by both answers "
                               f"(not trained); chosen {trained['chosen']} trained tokens, rejected "
                               f"{trained['rejected']}; both padded to the batch width {width} ({t.batch_size} pairs: "
                               f"{2 * t.batch_size} rows in one batch)")
        self.tokens.value = tables.pair_tokens_html(parts["prompt"], parts["chosen"], parts["rejected"])
        self.batch.value = self._pair_stats(fmt, train, t)
        self.say(f"preference pairs, {'chat template' if fmt.use_chat else 'plain text'}, max_length "
                 f"{t.max_length}, batch size {t.batch_size} pairs, pad to a multiple of {t.pad_to_multiple_of or 1}")
        self._shown = True

    def _pair_stats(self, fmt, train: pd.DataFrame, t) -> str:
        head = train.head(SAMPLE_ROWS)
        stats = pair_batch_stats(*(fmt.encode_many(side_rows(head, side).to_dict("records"))
                                   for side in ("chosen", "rejected")), t.batch_size, t.pad_to_multiple_of)
        table = pd.DataFrame([
            {"measure": "pairs sampled", "value": f"{stats['pairs']:,}"},
            {"measure": "tokens per row, chosen / rejected (mean)",
             "value": f"{stats['tokens_chosen']:.1f} / {stats['tokens_rejected']:.1f}"},
            {"measure": "trained tokens per answer, chosen / rejected (mean)",
             "value": f"{stats['trained_chosen']:.1f} / {stats['trained_rejected']:.1f}"},
            {"measure": "share of tokens not trained (the prompt and the chat template)",
             "value": f"{stats['prompt_share']:.1%}"},
            {"measure": "chosen answer longer than the rejected one (trained tokens)",
             "value": f"{stats['chosen_longer']:.0%} of pairs"},
            {"measure": f"padding share of the batches (both sides to one width; with pad_to_multiple_of "
                        f"{t.pad_to_multiple_of})",
             "value": f"{stats['padding_share']:.1%} ({stats['padding_share_rounded']:.1%})"},
            {"measure": f"pairs with a prompt cut in the middle at max_length {t.max_length}",
             "value": f"{stats['prompt_truncated']:,}"},
            {"measure": "pairs with an answer cut (trained tokens lost)", "value": f"{stats['response_truncated']:,}"},
        ])
        return "<b>pair batches</b>" + tables.table_html(table)
