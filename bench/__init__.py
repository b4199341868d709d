"""cslbench: a benchmark harness for pseudo-label selection in semi-supervised segmentation."""

__version__ = "0.1.0"
