"""Creates an RDS-format secret in the local AWS emulator, and rotates it the way a rotation
function does.

Usage:
  secret.py ENDPOINT create NAME USERNAME PASSWORD    (AWSCURRENT; prints the ARN)
  secret.py ENDPOINT pending NAME USERNAME PASSWORD   (createSecret step: prints the version id)
  secret.py ENDPOINT finish NAME VERSION              (finishSecret step: AWSCURRENT -> VERSION)

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


def rds_login(username, password, port):
    return json.dumps({"username": username, "password": password, "engine": "postgres", "port": port})


if step == "create":
    username, password = sys.argv[4:6]
    print(client.create_secret(Name=name, SecretString=rds_login(username, password, 5432))["ARN"])
elif step == "pending":
    # The port as a string, as some rotation templates write it.
    value = rds_login(*sys.argv[4:6], "5432")
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
