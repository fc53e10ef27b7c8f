"""Creates an RDS-format secret in the local AWS emulator (its first version is AWSCURRENT).
Usage: create_secret.py ENDPOINT NAME USERNAME PASSWORD"""

import json
import sys

import boto3

endpoint, name, username, password = sys.argv[1:5]
client = boto3.client(
    "secretsmanager",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
value = json.dumps({"username": username, "password": password, "engine": "postgres", "port": 5432})
print(client.create_secret(Name=name, SecretString=value)["ARN"])
