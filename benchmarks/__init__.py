"""dqid's benchmark: run it as ``venv/bin/python benchmarks/bench.py``."""
