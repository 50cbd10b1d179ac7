"""The emulated cloud: a moto server, an IMDSv2 emulator, and the fleet rehearsal.

Everything here listens on 127.0.0.1 only. It ships in the package because
``ec2-agent simulate`` needs it; the tests use the same pieces.
"""
