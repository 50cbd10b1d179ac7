"""``ec2-agent boot``: the phases' driver, the ASG lifecycle hook, and the instance
record ``run`` starts from (the typed context is ``agent.bootctx``).
"""
