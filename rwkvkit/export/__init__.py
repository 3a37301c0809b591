"""Export of rwkvkit checkpoints to other runtimes' file formats.

    gguf.py   GGUF for llama.cpp (architectures "rwkv6" and "rwkv7"): metadata, World tokenizer block,
              tensors renamed and laid out as llama.cpp loads them, f32 / f16 / bf16 / q8_0 / q4_0

Nothing here is imported by ``import rwkvkit``; the ``gguf`` package (``pip install 'rwkvkit[gguf]'``) is
imported only when an export runs.
"""
