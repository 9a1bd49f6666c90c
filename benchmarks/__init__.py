"""Side-by-side benchmarks against reference implementations, printed as ratios (`make bench`)."""
