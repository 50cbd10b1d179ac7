"""Safe replacement: the pure decision (decide), the store objects it runs on
(leases, suspicions, budget, kill switch), and the controller that acts.
"""
