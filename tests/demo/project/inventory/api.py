"""The JSON API: `route` answers a request; `serve` puts it on HTTP."""

import json
from http.server import BaseHTTPRequestHandler, HTTPServer

from inventory.store import Inventory


def route(inventory, method, path, body=None):
    """Returns (status, answer) for one request."""
    if method == "GET" and path == "/items":
        return 200, {"items": inventory.items()}
    if method == "POST" and path == "/items":
        try:
            count = inventory.add(body.get("name"), body.get("quantity", 1))
        except (AttributeError, ValueError) as e:
            return 400, {"error": str(e)}
        return 201, {"name": body["name"], "count": count}
    return 404, {"error": f"no route for {method} {path}"}


def serve(port=8000):
    inventory = Inventory()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            status, answer = route(inventory, method, self.path, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._answer("GET")

        def do_POST(self):
            self._answer("POST")

    HTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    serve()
