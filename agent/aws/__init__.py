"""The AWS adapters: the boto3 session, the lean botocore data, botocore's errors,
the S3 store, EC2 and Auto Scaling, IMDSv2, SSM/Secrets Manager secrets.
The only package that imports boto3 or botocore (checked by lint-imports).
"""
