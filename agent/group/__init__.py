"""The group as a member sees it: member records and two-clock liveness, peers
and the change marker, the heartbeat writer, the audit log.
"""
