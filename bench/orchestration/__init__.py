"""Orchestration: sweeps on Ray Tune and the `cslbench` command line. The top layer: may
import every layer below (tools, harness, results, data, contract); nothing imports it.
"""
