"""Figures and Table 1 from the evaluation JSONs (`fox plot`, `fox table`), and where to find them."""

from fox.report.browse import announce_at_exit, where
from fox.report.plots import PLOTS, plot
from fox.report.table import columns, table

__all__ = ["PLOTS", "announce_at_exit", "columns", "plot", "table", "where"]
