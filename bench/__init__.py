"""Speed and quality of byol_nb against peer BYOL libraries (byol-pytorch, lightly), side by side.

    python -m bench.run            # the tables in BENCHMARKS.md (needs `pip install -e .[bench]`)
    python -m bench.run --quick    # a smoke run of the same code in a few minutes

:mod:`bench.peers` trains each library the way its own documentation does, :mod:`bench.worker`
measures one run in a fresh process, :mod:`bench.run` alternates the runs and writes the tables.
"""
