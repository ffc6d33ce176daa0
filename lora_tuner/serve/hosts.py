"""Who a local server answers: loopback binds, and requests addressed to a loopback name. Plain ASGI, so the CLI can
ask before FastAPI (the serve extra) is imported."""
import ipaddress
import json


def is_loopback(host: str) -> bool:
    """Whether an address to bind (or a Host header's name) is this machine's loopback only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HostCheck:
    """A server bound to loopback answers only requests addressed to a loopback name. A web page on another site can
    make its own name resolve to 127.0.0.1 (DNS rebinding) and so reach a local server from the user's browser; its
    requests carry that name in Host, and are refused here before anything is read."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip()
        name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] if ":" in host else host
        if is_loopback(name):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": f"this server answers requests to localhost only, not to {host!r} "
                                                "(Host header)", "type": "invalid_request_error", "param": None,
                                     "code": "host_not_allowed"}})
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})
