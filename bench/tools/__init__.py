"""Developer tools: the selector demo, kernel timings, the GPU check, the contract check
for any selector. They may import the harness and everything below it; only the command
line (`bench.orchestration.cli`) imports them.
"""
