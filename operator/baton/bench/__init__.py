"""Baton's benchmarks (`baton bench ...`): each measures against a baseline taken in the same run and
writes its own section of BENCHMARKS.md. See `baton.bench.main` for the subcommands."""
