"""A numpy restatement of llama.cpp's rwkv6 / rwkv7 compute graphs, run on a GGUF file's tensors.

Written from llama.cpp's src/models/rwkv6-base.cpp, rwkv6.cpp, rwkv7-base.cpp and rwkv7.cpp (one
sequence, zero initial state, float64), op by op with ggml's semantics restated for arrays in numpy order
(the reverse of ggml's ne): ``mul_mat(a, b)`` contracts the first ggml dim of both, i.e. ``b @ a.T`` for
a matrix ``a``; reshapes and views keep ggml's memory order; broadcasting follows ggml's repeat rules.
It reads the tensors by their GGUF names and shapes only, so it checks the exporter's layout against
what llama.cpp's graph does with it, independently of rwkvkit's model code and of the tests' own inverse
of the layout.
"""

from __future__ import annotations

import numpy as np

GROUP_NORM_EPS = 64e-5  # hard-coded in both graphs (ggml_norm of each head)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def mul_mat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ggml_mul_mat for a matrix ``a`` (numpy (M, K), ggml ne (K, M)) and rows ``b`` (..., K) -> (..., M)."""
    return b @ a.T


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
    """ggml_rwkv_wkv7 from a zero state; all (T, H, N), w the per-step decay -> y (T, H, N)."""
    T, H, N = r.shape
    S = np.zeros((H, N, N))  # [head, value i, key j]
    y = np.zeros((T, H, N))
    for t in range(T):
        sa = np.einsum("hij,hj->hi", S, a[t])
        S = S * w[t][:, None, :] + v[t][:, :, None] * k[t][:, None, :] + sa[:, :, None] * b[t][:, None, :]
        y[t] = np.einsum("hij,hj->hi", S, r[t])
    return y


def rwkv6_time_mix(g: dict, i: int, cur: np.ndarray, x_prev: np.ndarray, N: int) -> np.ndarray:
    p = f"blk.{i}.time_mix_"
    T, C = cur.shape
    H = C // N
    sx = x_prev - cur
    xxx = sx * g[p + "lerp_x.weight"] + cur
    w1, w2 = g[p + "w1.weight"], g[p + "w2.weight"]  # numpy (5D, C), (5, C, D)
    D = w1.shape[0] // 5
    # reshape_4d(tanh(mul_mat(w1, xxx)), D, 1, 5, T), then permute(0, 1, 3, 2): numpy (5, T, 1, D)
    h = np.tanh(mul_mat(w1, xxx)).reshape(T, 5, 1, D).transpose(1, 0, 2, 3)
    # mul_mat(reshape_4d(w2, D, C, 1, 5), h): per plane j, h_j @ w2_j.T -> numpy (5, T, 1, C)
    m = np.einsum("jtsd,jcd->jtsc", h, w2.reshape(5, C, D))
    xxx = (m + g[p + "lerp_fused.weight"]) * sx.reshape(T, 1, C) + cur.reshape(T, 1, C)
    xw, xk, xv, xr, xg = (xxx[j].reshape(T, C) for j in range(5))  # views at offsets j * C * T
    r = mul_mat(g[p + "receptance.weight"], xr).reshape(T, H, N)
    k = mul_mat(g[p + "key.weight"], xk).reshape(T, H, N)
    v = mul_mat(g[p + "value.weight"], xv).reshape(T, H, N)
    gate = mul_mat(g[p + "gate.weight"], xg)
    gate = gate * sigmoid(gate)  # silu
    w = mul_mat(g[p + "decay_w2.weight"], np.tanh(mul_mat(g[p + "decay_w1.weight"], xw)))
    w = np.exp(-np.exp(w + g[p + "decay.weight"])).reshape(T, H, N)
    y = wkv6(r, k, v, g[p + "first.weight"].reshape(H, N), w).reshape(T, C)
    y = head_norm(y, g[p + "ln.weight"], g[p + "ln.bias"], H)
    return mul_mat(g[p + "output.weight"], y * gate)


def rwkv6_channel_mix(g: dict, i: int, cur: np.ndarray, x_prev: np.ndarray) -> np.ndarray:
    p = f"blk.{i}.channel_mix_"
    sx = x_prev - cur
    xk = sx * g[p + "lerp_k.weight"] + cur
    xr = sx * g[p + "lerp_r.weight"] + cur
    r = sigmoid(mul_mat(g[p + "receptance.weight"], xr))
    k = np.maximum(mul_mat(g[p + "key.weight"], xk), 0) ** 2
    return r * mul_mat(g[p + "value.weight"], k)


def rwkv7_time_mix(g: dict, i: int, cur, x_prev, v_first, N: int) -> tuple[np.ndarray, np.ndarray]:
    p = f"blk.{i}.time_mix_"
    T, C = cur.shape
    H = C // N
    xxx = cur + (x_prev - cur) * g[p + "lerp_fused.weight"].reshape(6, 1, C)  # ggml_lerp: (6, T, C)
    xr, xw, xk, xv, xa, xg = xxx
    r = mul_mat(g[p + "receptance.weight"], xr)
    w = mul_mat(g[p + "w2.weight"], np.tanh(mul_mat(g[p + "w1.weight"], xw))) + g[p + "w0.weight"]
    k = mul_mat(g[p + "key.weight"], xk)
    v = mul_mat(g[p + "value.weight"], xv)
    if v_first is None:
        v_first = v
    else:
        mix = mul_mat(g[p + "v2.weight"], mul_mat(g[p + "v1.weight"], xv)) + g[p + "v0.weight"]
        v = v + (v_first - v) * sigmoid(mix)
    gate = mul_mat(g[p + "g2.weight"], sigmoid(mul_mat(g[p + "g1.weight"], xg)))
    a = sigmoid(mul_mat(g[p + "a2.weight"], mul_mat(g[p + "a1.weight"], xa)) + g[p + "a0.weight"])
    kk = (k * g[p + "k_k.weight"]).reshape(T, H, N)
    kk = kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
    ka = k * g[p + "k_a.weight"]
    k = k + (a * ka - ka)
    decay = np.exp(-np.exp(-0.5) * sigmoid(w))  # the RWKV-7 decay of the raw w0 + lora sum
    heads = [t.reshape(T, H, N) for t in (r, decay, k, v)]
    y = wkv7(*heads, -kk, kk * a.reshape(T, H, N)).reshape(T, C)
    y = head_norm(y, g[p + "ln.weight"], g[p + "ln.bias"], H)
    rk = (heads[2] * heads[0] * g[p + "r_k.weight"].reshape(H, N)).sum(-1, keepdims=True)  # (T, H, 1)
    y = y + (heads[3] * rk).reshape(T, C)
    return mul_mat(g[p + "output.weight"], y * gate), v_first


def rwkv7_channel_mix(g: dict, i: int, cur: np.ndarray, x_prev: np.ndarray) -> np.ndarray:
    p = f"blk.{i}.channel_mix_"
    xk = cur + (x_prev - cur) * g[p + "lerp_k.weight"]
    return mul_mat(g[p + "value.weight"], np.maximum(mul_mat(g[p + "key.weight"], xk), 0) ** 2)


def llama_logits(g: dict[str, np.ndarray], meta: dict, tokens: list[int]) -> np.ndarray:
    """Logits (T, V) of llama.cpp's graph for ``meta['arch']`` over the GGUF tensors ``g`` (float64)."""
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
    return mul_mat(g["output.weight"], x)
