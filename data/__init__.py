"""The corpora: prepare.py tokenizes one (python -m data.prepare); each prepared corpus lives in data/<name>/."""
