"""The harness: config, data to model, the training loop and the pieces around it
(building a run, checkpoints, the evaluation schedule, the selector seam).

May import everything below it: foundation, `bench.contract`, `methods`/`csl` (only
through the registry), `bench.data` and `bench.results`.
"""
