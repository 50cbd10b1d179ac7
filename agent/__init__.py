"""ec2-agent: makes an EC2 instance ready to be replaced.

See DESIGN.md for the architecture. The package is split into a pure core
(decisions, parsing, validation) and thin I/O adapters; nothing here imports
boto3 at module import time, so `ec2-agent status` stays fast.
"""

__version__ = "0.1.0"
