"""Execution of typed IR: the reference interpreter (forward hooks)."""
