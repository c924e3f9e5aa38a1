"""Importing this module registers every built-in method family."""

from mergebench.methods import (  # noqa: F401
    arithmetic,
    breadcrumbs,
    cabs,
    consensus,
    dare,
    della,
    lines,
    model_stock,
    pcb,
    spectral,
    spherical,
    ties,
)
