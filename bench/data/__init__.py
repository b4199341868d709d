"""Datasets: the synthetic generator, real dataset layouts, splits, augmentation, loaders.

May import the foundation modules (`bench.labels`, `bench.files`) only: data knows
nothing of models, selectors or runs.
"""
