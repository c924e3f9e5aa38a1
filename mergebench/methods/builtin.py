"""Importing this module registers every built-in method family."""

from mergebench.methods import (  # noqa: F401
    adamerging,
    arithmetic,
    breadcrumbs,
    cabs,
    consensus,
    dare,
    della,
    fisher,
    lines,
    model_stock,
    pcb,
    regmean,
    spectral,
    spherical,
    ties,
)
