"""The fixed-size recurrent state of an RWKV model for B sequences: create, select rows, combine, move.

Per layer the state holds the time-mix token shift (the previous token's normalised input), the WKV
state and the channel-mix token shift. Layers are stacked on the first axis, sequences on the second.
The WKV part is always fp32 (decays close to 1 accumulate over thousands of steps); the shifts use the
model dtype.

Layout of ``wkv`` (see :func:`wkv_shape`):
- RWKV-5.2, 6 and 7: (L, B, H, N, N) indexed [layer, batch, head, value i, key j] ("[value, key]");
- RWKV-4: (L, B, 3, C_att) holding (aa, bb, pp) of the WKV-4 operator; a fresh sequence has
  aa = bb = 0 and pp = -1e38 (see ``rwkvkit.wkv.wkv4``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError

# pp of a fresh RWKV-4 sequence (the WKV-4 operator's PP_INIT; repeated so that this module stays light)
WKV4_PP_INIT = -1e38


def wkv_shape(config: ModelConfig, batch_size: int) -> tuple[int, ...]:
    """Shape of ``RWKVState.wkv`` for ``config`` and ``batch_size`` sequences."""
    if config.version == "4":
        return (config.n_layer, batch_size, 3, config.dim_att)
    return (config.n_layer, batch_size, config.n_head, config.head_size, config.head_size)


def layer_zero_wkv(config: ModelConfig, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One layer's wkv state of ``batch_size`` fresh sequences: zeros, pp = -1e38 for RWKV-4. fp32."""
    wkv = torch.zeros(wkv_shape(config, batch_size)[1:], device=device, dtype=torch.float32)
    if config.version == "4":
        wkv[:, 2] = WKV4_PP_INIT
    return wkv


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
        """The state of ``batch_size`` fresh sequences (zeros; pp = -1e38 for RWKV-4)."""
        L, C = config.n_layer, config.n_embd
        wkv = torch.stack([layer_zero_wkv(config, batch_size, device) for _ in range(L)])
        return cls(
            att_shift=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
            wkv=wkv,
            ffn_shift=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
        )

    @property
    def batch_size(self) -> int:
        return self.att_shift.shape[1]

    def check_compatible(self, config: ModelConfig, batch_size: int) -> None:
        """Raise RwkvkitError unless this state fits ``config`` and a batch of ``batch_size`` sequences."""
        want = wkv_shape(config, batch_size)
        if tuple(self.wkv.shape) != want or tuple(self.att_shift.shape) != (
            config.n_layer,
            batch_size,
            config.n_embd,
        ):
            raise RwkvkitError(
                f"state does not fit this model and batch: wkv {tuple(self.wkv.shape)}, expected {want}",
                param="state",
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
