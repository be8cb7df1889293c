#!/usr/bin/env python3
"""An nginx auth_http-style user lookup service, as an administrator would run one in front of a cluster.

Answers come from a JSON file read on every request, so that a test can change them:
  {"user@example.org": {"server": "127.0.0.1", "port": 10143, "user": "login-name"},
   "refused@example.org": {"status": "Invalid login or password", "wait": 1}}
"delay" (seconds) holds the answer back. A user missing from the file is refused ("Invalid login or password"). Every request's headers are
appended to the log file as one JSON object per line.
"""
import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answers", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            # HTTP header names are case-insensitive: logged lower-cased.
            headers = {k.lower(): v for k, v in self.headers.items()}
            with open(args.log, "a") as log:
                log.write(json.dumps(headers) + "\n")
            try:
                with open(args.answers) as f:
                    answers = json.load(f)
            except (OSError, ValueError):
                answers = {}
            user = unquote(self.headers.get("Auth-User", ""))
            answer = answers.get(user, {"status": "Invalid login or password"})
            if "delay" in answer:
                time.sleep(answer["delay"])
            self.send_response(200)
            if "server" in answer:
                self.send_header("Auth-Status", "OK")
                self.send_header("Auth-Server", answer["server"])
                self.send_header("Auth-Port", str(answer["port"]))
                if "user" in answer:
                    self.send_header("Auth-User", answer["user"])
            else:
                self.send_header("Auth-Status", answer["status"])
                if "wait" in answer:
                    self.send_header("Auth-Wait", str(answer["wait"]))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("ready", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
