"""Benchmarks of etcd_rdzv against a real etcd; run them with ``make bench``."""
