"""Research harness: compress a real language model, measure perplexity, size and latency.

Run ``python -m experiments list`` for the sweeps and ``python -m experiments run <sweep> --quick``.
"""
