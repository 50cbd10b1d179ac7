"""Configuration: the layers (baked < user-data < bundle), their schema, the
user-data decoder, and the memo of the validated config.
"""
