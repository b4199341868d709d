"""Baseline pseudo-label selectors, one module each; see SELECTORS.md for the formulas."""
