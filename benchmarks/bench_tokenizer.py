"""Benchmark the World tokenizer: rwkvkit vs the reference ``rwkv`` package's TRIE_TOKENIZER (not a test).

Measures encode and decode throughput (MB of UTF-8 per second and tokens per second) on English prose
(Shakespeare, data/shakespeare/train.txt), on a Chinese / Japanese / emoji / English mix generated here
from a fixed seed, and on its Chinese part alone; checks that both give identical ids; prints a markdown
table with the speedup, for both encode backends of rwkvkit: "aho-corasick" (the default, Rust via
ahocorasick-rs) and "python" (the pure-Python byte-level walk: the reference the fast path is tested
against, and the fallback where ahocorasick-rs cannot be imported). Neither caches anything, so each text
is encoded as if never seen before. Runs alternate between the tokenizers and the best of --repeats is
kept, so a busy machine skews them alike. Also reports load and build times.

    python benchmarks/bench_tokenizer.py                  # the table for benchmarks/RESULTS.md
    python benchmarks/bench_tokenizer.py --repeats 5 --mixed-chars 200000
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENGLISH = ROOT / "data" / "shakespeare" / "train.txt"

# Pools for the generated mixed text: frequent Chinese characters, kana, kanji, punctuation, emoji.
_HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
    "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本"
    "去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比"
)
_KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんがぎぐげござじずぜぞだでどばびぶべぼぱぴぷぺぽっゃゅょアイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワヲンー"  # noqa: E501
_KANJI = "日本東京大学先生時間言語世界電車会社仕事今年新聞写真友達映画音楽料理天気"
_PUNCT_ZH = "，。、！？：；「」（）"
_EMOJI = "😀😂🥲😍🤔🙏👍🏽🎉🔥✨🚀🌸🍣🐱🐶❤️⭐🌈☕🎵🍜🧪🫠🪿"
_ENGLISH_WORDS = "the model token stream of and to in is that for with RWKV world language data".split()


def mixed_text(n_chars: int, seed: int = 0, chinese_only: bool = False) -> str:
    """Deterministic Chinese / Japanese / emoji / English text of about n_chars characters."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        kind = 0.0 if chinese_only else rng.random()
        if kind < 0.45:  # a Chinese clause
            s = "".join(rng.choice(_HANZI) for _ in range(rng.randint(4, 18))) + rng.choice(_PUNCT_ZH)
        elif kind < 0.8:  # a Japanese clause: kana with some kanji
            s = "".join(
                rng.choice(_KANA) if rng.random() < 0.7 else rng.choice(_KANJI)
                for _ in range(rng.randint(4, 16))
            )
            s += rng.choice("。、！？")
        elif kind < 0.9:  # emoji
            s = "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 4)))
        else:  # a few English words
            s = " " + " ".join(rng.choice(_ENGLISH_WORDS) for _ in range(rng.randint(2, 8))) + ". "
        if rng.random() < 0.05:
            s += "\n\n"
        parts.append(s)
        size += len(s)
    return "".join(parts)


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict:
    """Best wall time in seconds of each function over `repeats` rounds.

    The functions run in turn within each round, so a busy machine slows them alike and the ratios stay
    meaningful.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def table_row(
    text: str, operation: str, backend: str, size_mb: float, n_tok: int, ours: float, theirs: float
) -> tuple:
    """One result row: sizes, both throughputs (from seconds ``ours`` and ``theirs``) and the speedup."""
    return (
        text,
        operation,
        backend,
        size_mb,
        n_tok,
        size_mb / theirs,
        size_mb / ours,
        n_tok / ours,
        theirs / ours,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--english", type=Path, default=DEFAULT_ENGLISH, help="English text file (UTF-8)")
    parser.add_argument("--mixed-chars", type=int, default=300_000, help="size of the generated mixed text")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (best is kept)")
    args = parser.parse_args()

    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkvkit.tokenizer import WorldTokenizer

    start = time.perf_counter()
    ref = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    ref_load = time.perf_counter() - start
    start = time.perf_counter()
    ac = WorldTokenizer(backend="aho-corasick")
    our_load = time.perf_counter() - start
    py = WorldTokenizer(backend="python")
    prompt = "User: hi! What is RWKV?\n\nAssistant:"
    start = time.perf_counter()
    py.encode(prompt)  # the first encode builds the byte trie's prefix set
    py_first = time.perf_counter() - start
    start = time.perf_counter()
    ac.encode(prompt)  # the first encode builds the automaton
    ac_first = time.perf_counter() - start
    start = time.perf_counter()
    WorldTokenizer()
    our_second = time.perf_counter() - start
    backends = {"aho-corasick": ac, "python": py}

    corpora = {
        "English (Shakespeare)": args.english.read_text(encoding="utf-8"),
        "zh/ja/emoji mix": mixed_text(args.mixed_chars),
        "Chinese only": mixed_text(args.mixed_chars, seed=1, chinese_only=True),
    }
    rows = []
    for name, text in corpora.items():
        size_mb = len(text.encode("utf-8")) / 1e6
        expected = ref.encode(text)
        for backend, tok in backends.items():
            if tok.encode(text) != expected:
                raise SystemExit(f"{name}: rwkvkit ({backend}) and the reference disagree")
        n_tok = len(expected)
        fns: dict[str, Callable[[], object]] = {"ref": lambda t=text: ref.encode(t)}
        for backend, tok in backends.items():
            fns[backend] = lambda t=text, k=tok: k.encode(t)
        fns["ref_dec"] = lambda i=expected: ref.decodeBytes(i).decode("utf-8", errors="replace")
        fns["dec"] = lambda i=expected: ac.decode(i)
        t = best_times(fns, args.repeats)
        for backend in backends:
            rows.append(table_row(name, "encode", backend, size_mb, n_tok, t[backend], t["ref"]))
        rows.append(table_row(name, "decode", "(shared)", size_mb, n_tok, t["dec"], t["ref_dec"]))

    print(f"vocab load: reference TRIE_TOKENIZER {ref_load:.2f} s; rwkvkit WorldTokenizer() {our_load:.2f} s")
    print(f"  another WorldTokenizer() (cached vocab) {our_second * 1e3:.2f} ms")
    print(f"  aho-corasick: first encode (builds the automaton) {ac_first:.2f} s")
    print(f"  python: first encode (builds the prefix set of the byte trie) {py_first:.2f} s")
    print("ids identical to the reference on every corpus, both backends: yes\n")
    print(
        "| text | operation | backend | MB | tokens | reference MB/s | rwkvkit MB/s | rwkvkit Mtok/s "
        "| speedup |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, op, backend, size_mb, n_tok, ref_mbs, our_mbs, our_toks, speedup in rows:
        print(
            f"| {name} | {op} | {backend} | {size_mb:.2f} | {n_tok:,} | {ref_mbs:.2f} | {our_mbs:.2f} | "
            f"{our_toks / 1e6:.2f} | {speedup:.1f}x |"
        )
    for backend in backends:
        speedups = [r[-1] for r in rows if r[2] == backend]
        median = statistics.median(speedups)
        print(f"\n{backend} encode speedup: min {min(speedups):.1f}x, median {median:.1f}x", end="")
    print()


if __name__ == "__main__":
    main()
