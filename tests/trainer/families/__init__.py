"""The family matrix: every step (train, merge, export, serve, adapters) on a tiny model of each
family users bring, with that family's real tokenizer and chat template (see catalog.py)."""
