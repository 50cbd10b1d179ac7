"""Data snapshots: the pure plan, chunked content-addressed backup, verified restore.
"""
