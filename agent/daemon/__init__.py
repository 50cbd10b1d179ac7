"""``ec2-agent run``: the daemon's loop.
"""
