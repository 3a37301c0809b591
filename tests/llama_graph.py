"""A numpy restatement of llama.cpp's rwkv6 / rwkv7 compute graphs, run on a GGUF file's tensors.

Written from llama.cpp's src/models/rwkv6-base.cpp, rwkv6.cpp, rwkv7-base.cpp and rwkv7.cpp and the
wkv kernels of ggml/src/ggml-cpu/ops.cpp, as llama-cpp-python 0.3.36 vendors them (one sequence, zero
initial state, float64), op by op with ggml's semantics restated for arrays in numpy order
(the reverse of ggml's ne): ``mul_mat(a, b)`` contracts the first ggml dim of both, i.e. ``b @ a.T`` for
a matrix ``a``; reshapes and views keep ggml's memory order; broadcasting follows ggml's repeat rules.
It reads the tensors by their GGUF names and shapes only, so it checks the exporter's layout against
what llama.cpp's graph does with it, independently of rwkvkit's model code and of the tests' own inverse
of the layout.

Given the tensors' ggml types as well, each product also converts its activations as llama.cpp's CPU
backend does before the dot products (ggml-cpu.c's ``vec_dot_type`` of the weight's type, through the
type's ``from_float``): rounded to f16 / bf16 for f16 / bf16 weights, quantized to Q8_0 blocks (32
values along the row, scale amax / 127 stored as f16, values round(x * 127 / amax) to nearest even as
arch/x86/quants.c's quantize_row_q8_0 does) for q8_0 / q4_0 weights, and left alone for f32 ones.
Without types the activations are exact, which is what rwkvkit computes with the file's dequantized
weights.
"""

from __future__ import annotations

import numpy as np

GROUP_NORM_EPS = 64e-5  # hard-coded in both graphs (ggml_norm of each head)
DECAY_SCALE = -0.606531  # rwkv7-base.cpp: w = exp(scale(sigmoid(w), -0.606531)), i.e. -exp(-0.5)
Q8_0_BLOCK = 32
Q8_0_ACTIVATIONS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # ggml types whose vec_dot_type is Q8_0


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def mul_mat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ggml_mul_mat for a matrix ``a`` (numpy (M, K), ggml ne (K, M)) and rows ``b`` (..., K) -> (..., M)."""
    return b @ a.T


def _bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 -> fp32, rounding to nearest even (ggml_compute_fp32_to_bf16; finite values)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def _q8_0(x: np.ndarray) -> np.ndarray:
    """The values a row of fp32 activations stands for once quantized to Q8_0 blocks along its last dim."""
    shape = x.shape
    blocks = x.astype(np.float32).reshape(-1, Q8_0_BLOCK)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    scale = (amax / np.float32(127)).astype(np.float16).astype(np.float64)  # y.d, stored as f16
    with np.errstate(divide="ignore"):
        inverse = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inverse)  # fp32 product, then _mm256_round_ps(_MM_ROUND_NEAREST)
    return (q * scale).reshape(shape)


def vec_dot_input(x: np.ndarray, ggml_type: str | None) -> np.ndarray:
    """The activations ``x`` as llama.cpp's CPU mul_mat uses them against a weight of ``ggml_type``."""
    if ggml_type is None or ggml_type == "F32":
        return x
    if ggml_type == "F16":
        return x.astype(np.float32).astype(np.float16).astype(np.float64)
    if ggml_type == "BF16":
        return _bf16(x)
    if ggml_type in Q8_0_ACTIVATIONS:
        return _q8_0(x)
    raise ValueError(f"no restatement of llama.cpp's activations for {ggml_type} weights")


class Weights:
    """A GGUF file's tensors by name (numpy order) and, if given, their ggml type names ("F32", "Q8_0",
    ...): ``w[name]`` is a tensor, ``w.mm(name, x)`` is ggml_mul_mat(tensor, x) with the activations
    converted for that type (exact without types)."""

    def __init__(self, tensors: dict[str, np.ndarray], types: dict[str, str] | None = None):
        self.tensors, self.types = tensors, types or {}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def input_for(self, name: str, x: np.ndarray) -> np.ndarray:
        return vec_dot_input(x, self.types.get(name))

    def mm(self, name: str, x: np.ndarray) -> np.ndarray:
        return mul_mat(self.tensors[name], self.input_for(name, x))


def shifted(x: np.ndarray) -> np.ndarray:
    """The previous token's row (zeros before the first token: a fresh state)."""
    return np.concatenate([np.zeros_like(x[:1]), x[:-1]])


def head_norm(y: np.ndarray, w: np.ndarray, b: np.ndarray, n_head: int) -> np.ndarray:
    """ggml_norm over each head's N values (reshape_3d to (N, H, T)), then * w + b over C."""
    T, C = y.shape
    yh = y.reshape(T, n_head, C // n_head)
    mu = yh.mean(-1, keepdims=True)
    var = ((yh - mu) ** 2).mean(-1, keepdims=True)
    return ((yh - mu) / np.sqrt(var + GROUP_NORM_EPS)).reshape(T, C) * w + b


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def wkv6(r, k, v, u, w) -> np.ndarray:
    """ggml_rwkv_wkv6 from a zero state; r, k, v, w (T, H, N), u (H, N) -> y (T, H, N)."""
    T, H, N = r.shape
    S = np.zeros((H, N, N))  # [head, key i, value j]
    y = np.zeros((T, H, N))
    for t in range(T):
        kv = k[t][:, :, None] * v[t][:, None, :]
        y[t] = np.einsum("hi,hij->hj", r[t], u[:, :, None] * kv + S)
        S = S * w[t][:, :, None] + kv
    return y


def wkv7(r, w, k, v, a, b) -> np.ndarray:
    """ggml_rwkv_wkv7 from a zero state; all (T, H, N), w the per-step decay -> y (T, H, N).

    The CPU kernel's arithmetic for the head sizes it computes: its SIMD loop walks a head GGML_F32_STEP
    values at a time (32 with AVX2, 64 with AVX-512) with no remainder, so a smaller head reads and
    writes past its own values (the exporter refuses those; see rwkvkit.export.gguf).
    """
    T, H, N = r.shape
    S = np.zeros((H, N, N))  # [head, value i, key j]
    y = np.zeros((T, H, N))
    for t in range(T):
        sa = np.einsum("hij,hj->hi", S, a[t])
        S = S * w[t][:, None, :] + v[t][:, :, None] * k[t][:, None, :] + sa[:, :, None] * b[t][:, None, :]
        y[t] = np.einsum("hij,hj->hi", S, r[t])
    return y


def rwkv6_time_mix(g: Weights, i: int, cur: np.ndarray, x_prev: np.ndarray, N: int) -> np.ndarray:
    p = f"blk.{i}.time_mix_"
    T, C = cur.shape
    H = C // N
    sx = x_prev - cur
    xxx = sx * g[p + "lerp_x.weight"] + cur
    w1, w2 = g[p + "w1.weight"], g[p + "w2.weight"]  # numpy (5D, C), (5, C, D)
    D = w1.shape[0] // 5
    # reshape_4d(tanh(mul_mat(w1, xxx)), D, 1, 5, T), then permute(0, 1, 3, 2): numpy (5, T, 1, D)
    h = np.tanh(g.mm(p + "w1.weight", xxx)).reshape(T, 5, 1, D).transpose(1, 0, 2, 3)
    # mul_mat(reshape_4d(w2, D, C, 1, 5), h): per plane j, h_j @ w2_j.T -> numpy (5, T, 1, C)
    m = np.einsum("jtsd,jcd->jtsc", g.input_for(p + "w2.weight", h), w2.reshape(5, C, D))
    xxx = (m + g[p + "lerp_fused.weight"]) * sx.reshape(T, 1, C) + cur.reshape(T, 1, C)
    xw, xk, xv, xr, xg = (xxx[j].reshape(T, C) for j in range(5))  # views at offsets j * C * T
    r = g.mm(p + "receptance.weight", xr).reshape(T, H, N)
    k = g.mm(p + "key.weight", xk).reshape(T, H, N)
    v = g.mm(p + "value.weight", xv).reshape(T, H, N)
    gate = g.mm(p + "gate.weight", xg)
    gate = gate * sigmoid(gate)  # silu
    w = g.mm(p + "decay_w2.weight", np.tanh(g.mm(p + "decay_w1.weight", xw)))
    w = np.exp(-np.exp(w + g[p + "decay.weight"])).reshape(T, H, N)
    y = wkv6(r, k, v, g[p + "first.weight"].reshape(H, N), w).reshape(T, C)
    y = head_norm(y, g[p + "ln.weight"], g[p + "ln.bias"], H)
    return g.mm(p + "output.weight", y * gate)


def rwkv6_channel_mix(g: Weights, i: int, cur: np.ndarray, x_prev: np.ndarray) -> np.ndarray:
    p = f"blk.{i}.channel_mix_"
    sx = x_prev - cur
    xk = sx * g[p + "lerp_k.weight"] + cur
    xr = sx * g[p + "lerp_r.weight"] + cur
    r = sigmoid(g.mm(p + "receptance.weight", xr))
    k = np.maximum(g.mm(p + "key.weight", xk), 0) ** 2
    return r * g.mm(p + "value.weight", k)


def rwkv7_time_mix(g: Weights, i: int, cur, x_prev, v_first, N: int) -> tuple[np.ndarray, np.ndarray]:
    p = f"blk.{i}.time_mix_"
    T, C = cur.shape
    H = C // N
    # sx = x_prev - cur repeated to 6 planes, * lerp_fused (6, 1, 1, C) + cur: numpy (6, T, C)
    xxx = (x_prev - cur) * g[p + "lerp_fused.weight"].reshape(6, 1, C) + cur
    xr, xw, xk, xv, xa, xg = xxx  # views at offsets j * C * T
    r = g.mm(p + "receptance.weight", xr)
    w = g.mm(p + "w2.weight", np.tanh(g.mm(p + "w1.weight", xw))) + g[p + "w0.weight"]
    w = np.exp(sigmoid(w) * DECAY_SCALE)  # the per-step decay, computed in the graph
    k = g.mm(p + "key.weight", xk)
    v = g.mm(p + "value.weight", xv)
    if v_first is None:
        v_first = v
    else:
        mix = g.mm(p + "v2.weight", g.mm(p + "v1.weight", xv)) + g[p + "v0.weight"]
        v = v + (v_first - v) * sigmoid(mix)
    gate = g.mm(p + "g2.weight", sigmoid(g.mm(p + "g1.weight", xg)))
    a = sigmoid(g.mm(p + "a2.weight", g.mm(p + "a1.weight", xa)) + g[p + "a0.weight"])
    kk = (k * g[p + "k_k.weight"]).reshape(T, H, N)
    kk = kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
    ka = k * g[p + "k_a.weight"]
    k = k + (a * ka - ka)
    heads = [t.reshape(T, H, N) for t in (r, w, k, v)]
    y = wkv7(*heads, -kk, kk * a.reshape(T, H, N)).reshape(T, C)
    y = head_norm(y, g[p + "ln.weight"], g[p + "ln.bias"], H)
    rk = (heads[2] * heads[0] * g[p + "r_k.weight"].reshape(H, N)).sum(-1, keepdims=True)  # (T, H, 1)
    y = y + (heads[3] * rk).reshape(T, C)
    return g.mm(p + "output.weight", y * gate), v_first


def rwkv7_channel_mix(g: Weights, i: int, cur: np.ndarray, x_prev: np.ndarray) -> np.ndarray:
    p = f"blk.{i}.channel_mix_"
    xk = cur + (x_prev - cur) * g[p + "lerp_k.weight"]
    return g.mm(p + "value.weight", np.maximum(g.mm(p + "key.weight", xk), 0) ** 2)


def llama_logits(
    tensors: dict[str, np.ndarray], meta: dict, tokens: list[int], types: dict[str, str] | None = None
) -> np.ndarray:
    """Logits (T, V) of llama.cpp's graph for ``meta['arch']`` over the GGUF ``tensors`` (float64);
    with ``types`` (name -> ggml type name) the products take activations as llama.cpp's CPU backend
    converts them for each weight's type."""
    g = Weights(tensors, types)
    arch, L, N, eps = meta["arch"], meta["n_layer"], meta["head_size"], meta["eps"]
    rescale = meta.get("rescale_every", 0)
    x = g["token_embd.weight"][tokens]  # get_rows
    x = layer_norm(x, g["token_embd_norm.weight"], g["token_embd_norm.bias"], eps)
    v_first = None
    for i in range(L):
        b = f"blk.{i}."
        att_norm = layer_norm(x, g[b + "attn_norm.weight"], g[b + "attn_norm.bias"], eps)
        if arch == "rwkv6":
            cur = rwkv6_time_mix(g, i, att_norm, shifted(att_norm), N)
        else:
            cur, v_first = rwkv7_time_mix(g, i, att_norm, shifted(att_norm), v_first, N)
        ffn_inp = cur + x
        ffn_norm = layer_norm(ffn_inp, g[b + "attn_norm_2.weight"], g[b + "attn_norm_2.bias"], eps)
        mix = rwkv6_channel_mix if arch == "rwkv6" else rwkv7_channel_mix
        x = mix(g, i, ffn_norm, shifted(ffn_norm)) + ffn_inp
        if rescale and (i + 1) % rescale == 0:
            x = x * 0.5
    x = layer_norm(x, g["output_norm.weight"], g["output_norm.bias"], eps)
    return g.mm("output.weight", x)
