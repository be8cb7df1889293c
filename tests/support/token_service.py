#!/usr/bin/env python3
"""An OAuth 2.0 token introspection endpoint (RFC 7662), as an organisation's identity provider serves one.

POST /introspect with `token=<access token>` answers {"active": true, "username": ..., "scope": "mail"} for
a token listed in the JSON file (read on every request, so that a test can change it:
{"<token>": "user@example.org"}) and {"active": false} for any other token (expired, revoked, unknown).
Each request's outcome is appended to the log file as one JSON object per line, naming the token by its
SHA-256 (hex), never by itself.
"""
import argparse
import hashlib
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            form = parse_qs(self.rfile.read(length).decode("ascii", "replace"))
            token = form.get("token", [""])[0]
            try:
                with open(args.tokens) as f:
                    tokens = json.load(f)
            except (OSError, ValueError):
                tokens = {}
            user = tokens.get(token)
            answer = {"active": True, "username": user, "scope": "mail"} if user else {"active": False}
            with open(args.log, "a") as log:
                digest = hashlib.sha256(token.encode()).hexdigest()
                log.write(json.dumps({"path": self.path, "token_sha256": digest, "active": answer["active"]}) + "\n")
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
