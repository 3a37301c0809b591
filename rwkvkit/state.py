"""The fixed-size recurrent state of an RWKV model for B sequences: create, select rows, combine, move.

Per layer the state holds the time-mix token shift (the previous token's normalised input), the WKV
matrix state and the channel-mix token shift. Layers are stacked on the first axis. The WKV part is
always fp32 (decays close to 1 accumulate over thousands of steps); the shifts use the model dtype.

Layout of ``wkv``: (L, B, H, N, N) indexed [layer, batch, head, value i, key j] ("[value, key]").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError


@dataclass
class RWKVState:
    """Recurrent state of B sequences. Treat as immutable: the model returns a new one each call."""

    att_shift: torch.Tensor  # (L, B, C)
    wkv: torch.Tensor  # (L, B, H, N, N) fp32, [value, key]
    ffn_shift: torch.Tensor  # (L, B, C)

    @classmethod
    def zeros(
        cls,
        config: ModelConfig,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> RWKVState:
        L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
        return cls(
            att_shift=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
            wkv=torch.zeros(L, batch_size, H, N, N, device=device, dtype=torch.float32),
            ffn_shift=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
        )

    @property
    def batch_size(self) -> int:
        return self.att_shift.shape[1]

    def check_compatible(self, config: ModelConfig, batch_size: int) -> None:
        """Raise RwkvkitError unless this state fits ``config`` and a batch of ``batch_size`` sequences."""
        want = (config.n_layer, batch_size, config.n_head, config.head_size, config.head_size)
        if tuple(self.wkv.shape) != want or tuple(self.att_shift.shape) != (
            config.n_layer,
            batch_size,
            config.n_embd,
        ):
            raise RwkvkitError(
                f"state does not fit this model and batch: wkv {tuple(self.wkv.shape)}, expected {want}"
            )

    def select(self, rows: Sequence[int] | torch.Tensor) -> RWKVState:
        """The state of the given batch rows, in that order (a copy)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.wkv.device)
        return RWKVState(
            self.att_shift.index_select(1, index),
            self.wkv.index_select(1, index),
            self.ffn_shift.index_select(1, index),
        )

    @staticmethod
    def concat(states: Sequence[RWKVState]) -> RWKVState:
        """Stack the sequences of several states into one batch."""
        if not states:
            raise ValueError("concat needs at least one state")
        return RWKVState(
            torch.cat([s.att_shift for s in states], dim=1),
            torch.cat([s.wkv for s in states], dim=1),
            torch.cat([s.ffn_shift for s in states], dim=1),
        )

    def clone(self) -> RWKVState:
        return RWKVState(self.att_shift.clone(), self.wkv.clone(), self.ffn_shift.clone())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RWKVState:
        """Move to ``device``; ``dtype`` applies to the shifts only (the WKV state stays fp32)."""
        return RWKVState(
            self.att_shift.to(device=device, dtype=dtype),
            self.wkv.to(device=device),
            self.ffn_shift.to(device=device, dtype=dtype),
        )

    def detach(self) -> RWKVState:
        return RWKVState(self.att_shift.detach(), self.wkv.detach(), self.ffn_shift.detach())
