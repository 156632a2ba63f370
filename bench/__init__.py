"""Benchmarks: planc against accelerate's planner (`python -m bench.placement`) and CLI start-up times
(`python -m bench.cli_timing`). Scripts that print tables; nothing here is imported by planc."""
