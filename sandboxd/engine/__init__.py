"""Lifecycle around the runtime: config, admission (concurrency + queue), work directories,
audit log, metrics, crash recovery, and the Core that runs requests (service.py)."""
