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
    fw_merging,
    lines,
    model_stock,
    opcm,
    pcb,
    regmean,
    regmean_plus_plus,
    spectral,
    spherical,
    ties,
    wemoe,
)
