"""Importing this module registers every built-in method family."""

from mergebench.methods import (  # noqa: F401
    arithmetic,
    consensus,
    dare,
    lines,
    model_stock,
    spherical,
    ties,
)
