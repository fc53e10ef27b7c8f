"""Local AWS API emulator for pgwarden's tests: moto's own server application, plus what
presigned STS GetCallerIdentity requests need (moto alone routes them to S3 and checks no
signature).

Usage: moto_launcher.py --port P [--verify-sts] [--exit-on-stdin-eof]
Prints "READY http://127.0.0.1:PORT" once listening.

With --verify-sts, every STS GetCallerIdentity request signed in the query string is checked
like real STS would: SigV4 signature recomputed with the secret moto issued for the key (an
IAM user's key or an AssumeRole session's), session token, and expiry. Failures answer
STS-style 403 XML (SignatureDoesNotMatch, InvalidClientTokenId, ExpiredToken).
"""

import argparse
import datetime
import hashlib
import hmac
import os
import sys
import threading
import urllib.parse

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
RFC3986_SAFE = "-_.~"


def sts_error(start_response, code, message):
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    ).encode()
    start_response("403 Forbidden", [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))])
    return [body]


def find_secret(access_key_id):
    """(secret, session token or None) moto issued for this key, or None."""
    from moto.iam.models import iam_backends
    from moto.sts.models import sts_backends

    for account in list(iam_backends.keys()):
        for partition in list(iam_backends[account].keys()):
            backend = iam_backends[account][partition]
            for user in backend.users.values():
                for key in user.access_keys:
                    if key.access_key_id == access_key_id:
                        return key.secret_access_key, None
    for account in list(sts_backends.keys()):
        for region in list(sts_backends[account].keys()):
            for role in sts_backends[account][region].assumed_roles:
                if role.access_key_id == access_key_id:
                    return role.secret_access_key, role.session_token
    return None


def signing_key(secret, date, region, service):
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def verify_presigned(environ, params):
    """None if the query-signed request is valid, else (code, message)."""
    credential = params.get("X-Amz-Credential", "")
    parts = credential.split("/")
    if len(parts) != 5:
        return "IncompleteSignature", "bad credential"
    akid, date, region, service, _ = parts
    found = find_secret(akid)
    if found is None:
        return "InvalidClientTokenId", "The security token included in the request is invalid."
    secret, session_token = found
    if session_token is not None and params.get("X-Amz-Security-Token") != session_token:
        return "InvalidClientTokenId", "The security token included in the request is invalid."
    try:
        signed_at = datetime.datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc
        )
        expires = int(params["X-Amz-Expires"])
    except (KeyError, ValueError):
        return "IncompleteSignature", "bad date or expiry"
    if datetime.datetime.now(datetime.timezone.utc) > signed_at + datetime.timedelta(seconds=expires):
        return "ExpiredToken", "The security token included in the request is expired"
    signed_headers = params.get("X-Amz-SignedHeaders", "").split(";")
    header_lines = []
    for name in signed_headers:
        if name == "host":
            value = environ.get("HTTP_HOST", "")
        else:
            value = environ.get("HTTP_" + name.upper().replace("-", "_"), "")
        header_lines.append(f"{name}:{' '.join(value.split())}\n")
    query = "&".join(
        f"{urllib.parse.quote(k, safe=RFC3986_SAFE)}={urllib.parse.quote(v, safe=RFC3986_SAFE)}"
        for k, v in sorted(params.items())
        if k != "X-Amz-Signature"
    )
    key = signing_key(secret, date, region, service)
    for payload_hash in (EMPTY_SHA256, "UNSIGNED-PAYLOAD"):
        canonical = "\n".join(
            ["GET", "/", query, "".join(header_lines), ";".join(signed_headers), payload_hash]
        )
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                params["X-Amz-Date"],
                f"{date}/{region}/{service}/aws4_request",
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if hmac.compare_digest(signature, params.get("X-Amz-Signature", "")):
            return None
    return "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."


class Shim:
    def __init__(self, app, verify_sts):
        self.app = app
        self.verify_sts = verify_sts

    def __call__(self, environ, start_response):
        params = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        if (
            environ.get("REQUEST_METHOD") == "GET"
            and params.get("Action") == "GetCallerIdentity"
            and "X-Amz-Credential" in params
        ):
            if self.verify_sts:
                failure = verify_presigned(environ, params)
                if failure is not None:
                    return sts_error(start_response, *failure)
            # moto routes by, and reads the caller from, the Authorization header only.
            environ["HTTP_AUTHORIZATION"] = (
                f"AWS4-HMAC-SHA256 Credential={params['X-Amz-Credential']}, "
                f"SignedHeaders={params.get('X-Amz-SignedHeaders', 'host')}, "
                f"Signature={params.get('X-Amz-Signature', '')}"
            )
        return self.app(environ, start_response)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--verify-sts", action="store_true")
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    args = parser.parse_args()
    app = Shim(DomainDispatcherApplication(create_backend_app), args.verify_sts)
    server = make_server(args.host, args.port, app, threaded=True)
    print(f"READY http://{args.host}:{server.server_port}", flush=True)
    if args.exit_on_stdin_eof:

        def watch_stdin():
            sys.stdin.read()
            os._exit(0)

        threading.Thread(target=watch_stdin, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
