"""The page (GET / and its files under /static/), served by whatever serves the API (the deployed
function, `faceflow serve`): the same origin as the routes it calls, nothing fetched from
anywhere else."""
import re
from pathlib import Path

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver
from aws_lambda_powertools.event_handler.exceptions import NotFoundError

PAGE_DIR = Path(__file__).resolve().parent / "static"
PAGE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
              ".css": "text/css; charset=utf-8"}
PAGE_FILE = r"^[a-z]{1,20}\.(html|js|css)$"
# Scripts and styles from the page's own origin only; images, video and the JSON report come
# from presigned storage URLs (another origin) or the browser's own blob: URLs.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data: https: http:; "
                                           "media-src 'self' blob: https: http:; connect-src 'self' blob: https: http:; "
                                           "object-src 'none'; base-uri 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def page_file(name: str) -> Response:
    path = PAGE_DIR / name
    if not re.match(PAGE_FILE, name) or not path.is_file():
        raise NotFoundError(f"no page file {name[:100]}")
    return Response(status_code=200, content_type=PAGE_TYPES[path.suffix], body=path.read_text(),
                    headers=PAGE_HEADERS)


def add_page_routes(app: ApiGatewayResolver) -> None:
    """GET / and GET /static/<name> on `app`, outside the OpenAPI document."""

    @app.get("/", operation_id="page", include_in_schema=False)
    def page():
        return page_file("index.html")

    @app.get("/static/<name>", operation_id="pageFile", include_in_schema=False)
    def page_static(name: str):
        return page_file(name)
