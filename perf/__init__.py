"""Benchmarks of shmq against peers, run side by side in one run, printing ratios."""
