"""The per-layer embedding table (E2B, E4B) trained on the rows the training text uses, the rest shared with the
teacher: the same training as the whole table, for a fraction of its memory.

E2B's and E4B's per-layer table (`embed_tokens_per_layer`, 262,144 rows of 35 x 256 and 42 x 256 values) is half of
each model, and it is only ever *looked up*: unlike the tied token table, it is not the output head. A row gets a
gradient only where its token occurs in a training batch, and every batch is a window of the training text, so the
rows of tokens absent from that text get a zero gradient at every step. AdamW (weight decay 0, as qat_train runs it)
never moves such a row: both moments stay 0, so its update is 0. Training the table is thus training its used rows
and keeping the others, which is what this module does:

    table  [V, D]   the teacher's tensor itself, frozen: no copy, not in the state dict or the checkpoint
    rows   [R, D]   trainable: the rows of the R distinct tokens of the training text (initialised from table)
    slot   [V]      a token's index in rows, or -1
    lookup(ids) = rows[slot[ids]] where slot[ids] >= 0, else table[ids]

The gradient, optimizer state and moving average are then R x D instead of V x D: for E2B, a few million tokens of
training text use tens of thousands of the 262,144 rows. `materialize` writes the trained rows into a copy of the
table for export. With a GGUF embedding grid (`fmt`), the looked-up rows are put on it (round-to-nearest with a
straight-through gradient, as FloatOnGrid does for the whole table); the formats' blocks run along a row, so that
is the whole table's rounding, row by row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SparseRowsEmbedding(nn.Module):
    def __init__(self, table: Tensor, used_ids: Tensor, fmt=None):
        super().__init__()
        self.register_buffer("table", table.detach(), persistent=False)  # the teacher's: never written
        ids = torch.unique(used_ids.to(table.device))  # (both derived from the training text: not checkpointed)
        slot = torch.full((table.shape[0],), -1, dtype=torch.int64, device=table.device)
        slot[ids] = torch.arange(ids.numel(), device=table.device)
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("ids", ids, persistent=False)
        self.rows = nn.Parameter(table.detach()[ids].clone())
        self.fmt = fmt

    def forward(self, ids: Tensor) -> Tensor:
        s = self.slot[ids]
        trained = s >= 0
        out = torch.where(trained[..., None], F.embedding(s.clamp(min=0), self.rows), F.embedding(ids, self.table))
        if self.fmt is not None:
            from gemmaquant.qat.fake_quant import fake_quantize

            out = fake_quantize(out.reshape(-1, out.shape[-1]), self.fmt).view(out.shape)
        return out

    @torch.no_grad()
    def materialize(self) -> nn.Embedding:
        """A plain nn.Embedding holding the table with the trained rows written in (on the grid, with `fmt`)."""
        w = self.table.clone()
        w[self.ids] = self.rows.detach().to(w.dtype)
        if self.fmt is not None:
            from gemmaquant.qat.fake_quant import quantize_rows

            w = self.fmt.dequantize(quantize_rows(w, self.fmt)).to(w.dtype)
        return nn.Embedding.from_pretrained(w, freeze=True)  # (wraps w: no second table allocated)

    def extra_repr(self) -> str:
        grid = f", on {self.fmt.name}'s grid" if self.fmt is not None else ""
        return f"{self.rows.shape[0]} of {self.table.shape[0]} rows trained{grid}"
