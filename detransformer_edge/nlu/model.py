"""Intent + slot heads on an encoder (standard or decoupled MiniLM).

The heads read only the encoder's last hidden states, so they run on the leader after the
devices computed those states (``IntentSlotHeads.forward(hidden, mask)``).
"""

from __future__ import annotations

import torch
from torch import nn

from detransformer_edge.model.encoder import Encoder, mean_pool


class IntentSlotHeads(nn.Module):
    """Intent classifier on the mean-pooled states, BIO tagger on every token."""

    def __init__(self, d_model: int, n_intents: int, n_tags: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.intent = nn.Linear(d_model, n_intents)
        self.slot = nn.Linear(d_model, n_tags)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, T, d) -> intent logits (B, n_intents), tag logits (B, T, n_tags)."""
        pooled = mean_pool(hidden, attention_mask, normalize=False)  # (B, d)
        return self.intent(self.dropout(pooled)), self.slot(self.dropout(hidden))


class IntentSlotModel(nn.Module):
    def __init__(self, encoder: Encoder, n_intents: int, n_tags: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = IntentSlotHeads(encoder.cfg.d_model, n_intents, n_tags)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.encoder(input_ids, attention_mask), attention_mask)
