"""Results: the run record (its one writer and reader), leaderboards, statistics, figures.

May import the foundation modules and `bench.contract`; never the harness, so a
leaderboard is rebuilt from records alone, on any machine.
"""
