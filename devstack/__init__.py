"""Local stack for the demo, the tests and the benchmarks: real servers on free ports."""
