"""Data preparation (prepare.py) and batch loading (loader.py) for GPT-2-tokenized corpora."""
