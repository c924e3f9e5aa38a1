"""Importing this module registers every built-in method family."""

from mergebench.methods import arithmetic, dare, ties  # noqa: F401
