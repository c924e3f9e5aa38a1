"""mergebench: a benchmark and evaluation harness for model-merging methods."""

__version__ = "0.1.0"
