"""Makes a pgwarden `sts` token with the AWS SDK for Python, the way a Lambda function
would (see the README): a presigned STS GetCallerIdentity request binding pgwarden's
server id and the database user.

Usage: sts_token.py ENDPOINT ACCESS_KEY_ID SECRET SESSION_TOKEN|- SERVER_ID DB_USER"""

import base64
import sys

import botocore.auth
import botocore.awsrequest
import botocore.credentials

endpoint, akid, secret, session, server_id, db_user = sys.argv[1:7]
request = botocore.awsrequest.AWSRequest(
    method="GET",
    url=f"{endpoint}/?Action=GetCallerIdentity&Version=2011-06-15",
    headers={"x-pgwarden-server-id": server_id, "x-pgwarden-db-user": db_user},
)
credentials = botocore.credentials.Credentials(akid, secret, None if session == "-" else session)
botocore.auth.SigV4QueryAuth(credentials, "sts", "us-east-1", expires=900).add_auth(request)
print("pgwarden-sts:" + base64.urlsafe_b64encode(request.url.encode()).decode().rstrip("="))
