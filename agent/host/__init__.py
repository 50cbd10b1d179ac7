"""This machine: atomic files, the local state status reads, sd_notify, health
checks, the HTTP endpoint, Prometheus metrics.
"""
