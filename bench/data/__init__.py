"""Datasets: the synthetic generator, real dataset layouts, splits, augmentation, loaders."""
