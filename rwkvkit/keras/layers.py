"""The RWKV-6 time-mix core as a Keras 3 layer: :class:`WKV6`, owning ``u`` and an optional state bank.

The layer runs :func:`rwkvkit.keras.ops.wkv6` (the backend is read at call time: rwkvkit.jax on jax,
rwkvkit.wkv on torch, the keras.ops chunked form elsewhere). It takes the projections r, k, v, w as
(B, T, C) tensors, C = num_heads * head_size (what Dense layers give), and returns y (B, T, C).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from rwkvkit.errors import RwkvkitError
from rwkvkit.keras.ops import DEFAULT_CHUNK_SIZE, IMPLS, wkv6

DECAYS = ("raw", "log")


@keras.saving.register_keras_serializable(package="rwkvkit")
class WKV6(keras.layers.Layer):
    """RWKV-6 WKV: ``y = layer(r, k, v, w, initial_state=None, state_map=None)``.

    Args:
        num_heads, head_size: H and N (C = H * N).
        decay: how ``w`` is given. "raw" (default, the RWKV-6 checkpoints' and the seed's convention):
            the decay is exp(-exp(w)), so w = time_decay + lora(x) goes in as is. "log": w is already
            the log of the decay (w <= 0), rwkvkit's operator convention.
        return_state: also return the final state (B, H, N, N) float32, [value, key].
        state_bank: 0 (no trainable state) or n > 0: the layer owns a trainable bank ``initial_state``
            (n, H, N, N) [value, key], zeros at first (state tuning). With n = 1 it is shared by every row;
            with n > 1 pass ``state_map`` (B,) int32 to pick each row's entry. An ``initial_state``
            input, when given, is used instead of the bank.
        chunk_size: chunk length of the chunked forms.
        impl: None (the backend's native form) or "keras" (the keras.ops form on any backend).
        u_initializer: initializer of ``u`` (time_faaaa), (H, N).

    Inputs r, k, v, w: (B, T, C); ``initial_state``: (B, H, N, N), (1, H, N, N) or a bank with
    ``state_map``. Output: y (B, T, C) in r's dtype, or [y, final_state] with ``return_state``.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        decay: str = "raw",
        return_state: bool = False,
        state_bank: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        impl: str | None = None,
        u_initializer: Any = "zeros",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if decay not in DECAYS:
            raise RwkvkitError(f"decay must be one of {DECAYS}, got {decay!r}")
        if impl not in IMPLS:
            raise RwkvkitError(f"impl must be one of {IMPLS}, got {impl!r}")
        if num_heads < 1 or head_size < 1 or state_bank < 0 or chunk_size < 1:
            raise RwkvkitError("num_heads, head_size and chunk_size must be >= 1 and state_bank >= 0")
        self.num_heads, self.head_size = num_heads, head_size
        self.decay, self.return_state, self.state_bank = decay, return_state, state_bank
        self.chunk_size, self.impl = chunk_size, impl
        self.u_initializer = keras.initializers.get(u_initializer)
        H, N = num_heads, head_size
        self.u = self.add_weight(shape=(H, N), initializer=self.u_initializer, name="time_faaaa")
        self.initial_state = None
        if state_bank:
            self.initial_state = self.add_weight(
                shape=(state_bank, H, N, N), initializer="zeros", name="initial_state"
            )
        self.built = True  # the weights do not depend on the input shapes

    def call(
        self,
        r: Any,
        k: Any,
        v: Any,
        w: Any,
        initial_state: Any = None,
        state_map: Any = None,
    ) -> Any:
        B, T, C = r.shape
        H, N = self.num_heads, self.head_size
        if C != H * N:
            raise RwkvkitError(f"inputs must be (B, T, {H * N}) for {H} heads of {N}, got {tuple(r.shape)}")
        r4, k4, v4, w4 = (ops.reshape(x, (B, T, H, N)) for x in (r, k, v, w))
        if self.decay == "raw":
            w4 = -ops.exp(ops.cast(w4, "float64" if r.dtype == "float64" else "float32"))
        state = initial_state
        if state is None and self.initial_state is not None:
            state = ops.convert_to_tensor(self.initial_state)
        u = ops.cast(ops.convert_to_tensor(self.u), r.dtype)
        y, final = wkv6(r4, w4, k4, v4, u, state, state_map, impl=self.impl, chunk_size=self.chunk_size)
        y = ops.reshape(y, (B, T, C))
        return [y, final] if self.return_state else y

    def compute_output_shape(self, r_shape: tuple, *args: Any, **kwargs: Any) -> Any:
        if self.return_state:
            return [tuple(r_shape), (r_shape[0], self.num_heads, self.head_size, self.head_size)]
        return tuple(r_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            head_size=self.head_size,
            decay=self.decay,
            return_state=self.return_state,
            state_bank=self.state_bank,
            chunk_size=self.chunk_size,
            impl=self.impl,
            u_initializer=keras.initializers.serialize(self.u_initializer),
        )
        return config
