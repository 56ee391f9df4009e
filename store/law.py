"""Moved: the entropy–reward law is fitted once, in store/health.py (`LawFit`, `fit_entropy_law`). These names stay
importable from here only until dashboard/ (page_law's charts, the cached queries) and benchmarks/dashboard_bench.py
import them from store/health.py; then this file goes."""

from forkwatch.store.health import LawFit, fit_entropy_law
from forkwatch.store.health_rules import LAW_MIN_POINTS as MIN_POINTS
from forkwatch.store.health_rules import LAW_MIN_R2 as MIN_R2

__all__ = ["MIN_POINTS", "MIN_R2", "LawFit", "fit_entropy_law"]
