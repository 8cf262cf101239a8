"""image_uri fetching: s3 via the test endpoint, http(s) against a local server, local prefixes."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from otmel.image_fetch import ImageFetchError, ImagePolicy, fetch_image

from conftest import png_bytes

PNG = png_bytes(3)
BIG = b"x" * 5000


@pytest.fixture(scope="module")
def server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            routes = {"/img.png": PNG, "/big": BIG}
            if self.path == "/slow":
                time.sleep(1.5)
            if self.path in ("/redirect", "/redirect2"):
                self.send_response(302)
                self.send_header("Location", "/img.png" if self.path == "/redirect" else "/redirect")
                self.end_headers()
                return
            if self.path not in routes and self.path != "/slow":
                self.send_error(404)
                return
            body = routes.get(self.path, PNG)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


OPEN = ImagePolicy(allow_private_hosts=True, timeout_s=0.5, max_bytes=4000)


def test_loopback_is_refused_by_default_and_fetched_when_allowed(server):
    with pytest.raises(ImageFetchError, match="loopback address .*--allow-private-hosts"):
        fetch_image(f"{server}/img.png", ImagePolicy())
    assert fetch_image(f"{server}/img.png", OPEN) == PNG
    with pytest.raises(ImageFetchError, match="not allowed"):
        fetch_image(f"{server}/img.png", ImagePolicy(allow_http=False, allow_private_hosts=True))


def test_http_errors_caps_timeouts_and_redirects(server):
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        fetch_image(f"{server}/missing", OPEN)
    with pytest.raises(ImageFetchError, match="4000-byte cap"):
        fetch_image(f"{server}/big", OPEN)
    t0 = time.perf_counter()
    with pytest.raises(ImageFetchError, match="fetch failed"):
        fetch_image(f"{server}/slow", OPEN)
    assert time.perf_counter() - t0 < 1.4  # gave up at the timeout, not after the body
    assert fetch_image(f"{server}/redirect2", OPEN) == PNG  # two hops
    with pytest.raises(ImageFetchError, match="more than 1 redirects"):
        fetch_image(f"{server}/redirect2", ImagePolicy(allow_private_hosts=True, max_redirects=1))


def test_local_paths_only_under_an_allowed_prefix(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(b"secret")
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    policy = ImagePolicy(allowed_prefixes=(str(allowed),))
    assert fetch_image(str(allowed / "a.png"), policy) == PNG
    assert fetch_image(f"file://{allowed / 'a.png'}", policy) == PNG
    for bad in (str(tmp_path / "secret.png"), str(allowed / ".." / "secret.png"), str(allowed / "link.png")):
        with pytest.raises(ImageFetchError, match="outside the allowed"):
            fetch_image(bad, policy)
    with pytest.raises(ImageFetchError, match="not allowed"):
        fetch_image(str(allowed / "a.png"), ImagePolicy())
    with pytest.raises(ImageFetchError, match="cannot read"):
        fetch_image(str(allowed / "missing.png"), policy)
    with pytest.raises(ImageFetchError, match="unsupported image URI scheme 'ftp'"):
        fetch_image("ftp://example.com/a.png", policy)


def test_s3_images_through_the_test_endpoint(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").put_object(
        Bucket="otmel-test", Key="images/a.png", Body=PNG)
    policy = ImagePolicy(s3_endpoint=s3_server)
    assert fetch_image("s3://otmel-test/images/a.png", policy) == PNG
    with pytest.raises(ImageFetchError, match="cannot read s3://otmel-test/images/nope.png"):
        fetch_image("s3://otmel-test/images/nope.png", policy)
