"""Browser security headers on every response: the web client at ``/ui/`` and the API alike.

- ``Content-Security-Policy``: the client is ES modules and one stylesheet served from this
  origin, with no inline script or style, so the policy allows exactly that (``default-src
  'self'``), no plugins, no ``<base>`` rewriting, and no framing by any site (``frame-ancestors
  'none'``: no clickjacking of the cancel button or the key form). A JSON answer gets the same
  policy: if a browser is ever made to render one, nothing in it runs.
- ``X-Content-Type-Options: nosniff``: a browser takes each file as its declared type (an
  uploaded text rendered as a script would be a cross-site scripting hole).
- ``Referrer-Policy: no-referrer``: no URL of this service (which may carry ids) leaks to
  another site.

The interactive API docs (``/docs``, ``/redoc``) are FastAPI's pages, which load Swagger UI
and ReDoc from a CDN and start them with an inline script; they get a policy that allows that
CDN and their inline code, and still forbids framing. Nothing else is served under them.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_CDN = "https://cdn.jsdelivr.net"
DOCS_CONTENT_SECURITY_POLICY = (
    f"default-src 'self'; script-src 'self' 'unsafe-inline' {_CDN}; "
    f"style-src 'self' 'unsafe-inline' {_CDN} https://fonts.googleapis.com; "
    "font-src 'self' https://fonts.gstatic.com; img-src 'self' data: https:; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")


class SecurityHeaders:
    """ASGI middleware (pure ASGI, so event streams pass through unbuffered)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = DOCS_CONTENT_SECURITY_POLICY if scope["path"] in DOCS_PATHS else CONTENT_SECURITY_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value) for name, value in message.get("headers", [])
                    if name.lower() not in _SET_HERE
                ]
                headers += [
                    (b"content-security-policy", policy.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_SET_HERE = {b"content-security-policy", b"x-content-type-options", b"referrer-policy"}
