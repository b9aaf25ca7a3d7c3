"""``python -m benchmarks [--quick]``: run every benchmark and write benchmarks/results.md."""

from benchmarks.run import main

main()
