"""Merging methods: pure functions over stacked task vectors, registered by name."""

from mergebench.methods.registry import HParam, MergeMethod, all_methods, get_method, register

__all__ = ["HParam", "MergeMethod", "all_methods", "get_method", "register"]
