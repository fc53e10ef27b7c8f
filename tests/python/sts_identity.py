"""Creates, in the local AWS emulator, an IAM user with an access key and a Lambda-like
assumed-role session, and prints their credentials as JSON (for pgwarden's STS tests)."""

import json
import sys
import uuid

import boto3

endpoint = sys.argv[1]
role_name = sys.argv[2] if len(sys.argv) > 2 else "orders-fn"
kw = dict(endpoint_url=endpoint, region_name="us-east-1")
iam = boto3.client("iam", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap", **kw)
user = f"tester-{uuid.uuid4().hex[:8]}"
iam.create_user(UserName=user)
key = iam.create_access_key(UserName=user)["AccessKey"]
sts = boto3.client(
    "sts", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"], **kw
)
role = sts.assume_role(
    RoleArn=f"arn:aws:iam::123456789012:role/{role_name}", RoleSessionName="lambda-session"
)["Credentials"]
print(
    json.dumps(
        {
            "user": {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"], "name": user},
            "role": {
                "id": role["AccessKeyId"],
                "secret": role["SecretAccessKey"],
                "token": role["SessionToken"],
            },
        }
    )
)
