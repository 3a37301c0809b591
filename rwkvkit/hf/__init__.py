"""rwkvkit inside Hugging Face transformers (extra: transformers)."""
