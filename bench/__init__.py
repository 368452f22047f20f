"""Benchmarks of the pipeline against physical floors and dlt, in one run: `python -m bench.run`.

See bench/README.md for what is measured and how, and docs/performance.md for the results.
"""
