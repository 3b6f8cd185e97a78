"""Helpers shared by the tests, tests/mpi and the link benchmark: imported as ``support.…`` (pytest
puts tests/ on the path: ``pythonpath`` in pyproject.toml).

- ``models``: tiny random checkpoints of each supported architecture, saved by transformers
- ``stages``: a whole-model stage in this process, and greedy generation with it
- ``launch``: the package's commands in fresh processes, under mpiexec with several ranks
- ``servers``: a real ``mdi_mpi.serve`` job
- ``hosts``: test hosts in network namespaces, each with an sshd (``scripts/testhosts.sh``)
- ``bench_links``: the ring over emulated links between test hosts (``python -m support.bench_links``)
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
