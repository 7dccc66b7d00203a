"""Commands that are not stages of the pipeline: sweeps, benchmarks, exports, checks. Run from the root: python -m scripts.<name>."""
