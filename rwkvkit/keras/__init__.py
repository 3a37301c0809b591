"""rwkvkit for Keras 3 (extra: ``pip install 'rwkvkit[keras]'``): the RWKV-6 WKV layer and op.

:class:`~rwkvkit.keras.layers.WKV6` is the time-mix core as a layer (owns ``u``, optional trainable state
bank); :mod:`rwkvkit.keras.ops` holds the backend-agnostic op :func:`~rwkvkit.keras.ops.wkv6` and the
seed's signatures (``rwkv6_op``, ``RWKVKernelOperator``, ``get_rwkv6_kernel``). The backend is read from
``keras.backend.backend()`` at call time: jax -> rwkvkit.jax, torch -> rwkvkit.wkv, others -> keras.ops.
"""

from rwkvkit.keras.layers import WKV6
from rwkvkit.keras.ops import RWKVKernelOperator, get_rwkv6_kernel, rwkv6_op, wkv6, wkv6_keras

__all__ = ["WKV6", "RWKVKernelOperator", "get_rwkv6_kernel", "rwkv6_op", "wkv6", "wkv6_keras"]
