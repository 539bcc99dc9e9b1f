"""/console: the web console's files (plain HTML, CSS and JavaScript modules in
`services/gateway/console/`, no build step, nothing fetched from elsewhere: it works
air-gapped).

The files hold no data and a browser opening the page sends no API key, so they are served
ahead of the key check (`ConsoleFiles` wraps the application outside the edge middleware).
The page asks for the key and the user and sends them with every API call it makes, as any
client does; it keeps them in the tab's sessionStorage only."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
PREFIX = "/console"
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# no script, style or image from anywhere but the gateway itself; presigned image URLs point at
# the object storage, hence `img-src *`; fetch/XHR go to the gateway and to presigned upload URLs
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data: blob: http: https:; connect-src 'self' http: https:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def console_files() -> dict[str, Path]:
    """The files the console serves, by their path under /console/ (only these: no listing, no
    path from the request ever reaches the file system)."""
    return {
        f"{PREFIX}/{path.relative_to(CONSOLE_DIR).as_posix()}": path
        for path in CONSOLE_DIR.rglob("*")
        if path.is_file() and path.suffix in MEDIA_TYPES
    }


class ConsoleFiles:
    """Pure ASGI: GET/HEAD of /console and its files; everything else goes on to the API."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.files = console_files()
        self.files[f"{PREFIX}/"] = CONSOLE_DIR / "index.html"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        await self.answer(scope)(scope, receive, send)

    def answer(self, scope: Scope) -> Response:
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            return Response(status_code=405, headers={"allow": "GET, HEAD"})
        if path == PREFIX:
            return RedirectResponse(f"{PREFIX}/", status_code=308)
        file = self.files.get(path)
        if file is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return FileResponse(file, media_type=MEDIA_TYPES[file.suffix], headers=SECURITY_HEADERS)
