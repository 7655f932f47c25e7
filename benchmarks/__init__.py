"""gemvg.benchmarks."""
