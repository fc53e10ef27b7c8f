"""Rotates an RDS-format secret in the local AWS emulator the way a rotation function does.

Usage:
  rotate_secret.py ENDPOINT pending NAME USERNAME PASSWORD   (createSecret: prints the version id)
  rotate_secret.py ENDPOINT finish NAME VERSION              (finishSecret: AWSCURRENT -> VERSION)

The setSecret step (ALTER ROLE ... PASSWORD) is the caller's, in Postgres."""

import json
import sys
import uuid

import boto3

endpoint, step, name = sys.argv[1:4]
client = boto3.client(
    "secretsmanager",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
if step == "pending":
    username, password = sys.argv[4:6]
    value = json.dumps(
        {"username": username, "password": password, "engine": "postgres", "port": "5432"}
    )
    token = str(uuid.uuid4())
    client.put_secret_value(
        SecretId=name, ClientRequestToken=token, SecretString=value, VersionStages=["AWSPENDING"]
    )
    print(token)
elif step == "finish":
    version = sys.argv[4]
    stages = client.describe_secret(SecretId=name)["VersionIdsToStages"]
    current = next(v for v, labels in stages.items() if "AWSCURRENT" in labels)
    client.update_secret_version_stage(
        SecretId=name,
        VersionStage="AWSCURRENT",
        MoveToVersionId=version,
        RemoveFromVersionId=current,
    )
else:
    sys.exit(f"unknown step {step!r}")
