"""Request path -> stored name (the rules in serve_image/paths.py and docs/http.md)."""

from __future__ import annotations

import pytest

from serve_image.errors import BadRequest, NotFound, URITooLong
from serve_image.paths import FileName, request_name


@pytest.mark.parametrize(
    ("raw", "name", "var_dir", "versioned"),
    [
        (
            b"/var/intranet/storage/images/a/b.jpg",
            "var/intranet/storage/images/a/b.jpg",
            "var/intranet",
            False,
        ),
        (
            b"/var/intranet/storage/images-versioned/a/1/b.jpg",
            "var/intranet/storage/images-versioned/a/1/b.jpg",
            "var/intranet",
            True,
        ),
        (b"/var/storage/images/x.png", "var/storage/images/x.png", "var", False),
        # eZ bug #14153: the name is percent-decoded.
        (
            b"/var/s/storage/images/my%20photo.jpg",
            "var/s/storage/images/my photo.jpg",
            "var/s",
            False,
        ),
        (
            b"/var/s/storage/images/caf%C3%A9.jpg",
            "var/s/storage/images/caf\u00e9.jpg",
            "var/s",
            False,
        ),
        # eZ bug #015459: the query string is not part of the name.
        (b"/var/s/storage/images/a.jpg?v=2", "var/s/storage/images/a.jpg", "var/s", False),
        (b"/var/s/storage/images/a\\b.jpg", "var/s/storage/images/a\\b.jpg", "var/s", False),
    ],
)
def test_names(raw: bytes, name: str, var_dir: str, versioned: bool) -> None:
    assert request_name(raw) == FileName(name, var_dir, versioned)


@pytest.mark.parametrize(
    "raw",
    [
        b"/var/s/storage/images/",  # no file
        b"/var/s/storage/original/a.pdf",  # not an image prefix
        b"/var/a/b/storage/images/x.jpg",  # var dir of two segments
        b"/index.php",
        b"/var/s/storage/images/../../../etc/passwd",
        b"/var/s/storage/images/%2e%2e/x.jpg",
        b"/var/s/storage/images/%2e./x.jpg",
        b"/var/s/storage/images/./x.jpg",
        b"/var/s/storage/images//x.jpg",
        b"/var/s/storage/images/a/%2F/x.jpg",
        b"//var/s/storage/images/x.jpg",
        b"var/s/storage/images/x.jpg",
    ],
)
def test_not_found(raw: bytes) -> None:
    with pytest.raises(NotFound):
        request_name(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"/var/s/storage/images/a%zz.jpg",
        b"/var/s/storage/images/a%4.jpg",
        b"/var/s/storage/images/a%.jpg",
        b"/var/s/storage/images/%ff%fe.jpg",  # not UTF-8
        b"/var/s/storage/images/a%00.jpg",  # NUL
        b"/var/s/storage/images/a%0a.jpg",
        b"/var/s/storage/images/a\x7f.jpg",
        b"/var/s/storage/images/a%C2%85.jpg",  # U+0085, a C1 control
    ],
)
def test_bad_request(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        request_name(raw)


def test_long_path_is_414() -> None:
    with pytest.raises(URITooLong):
        request_name(b"/var/s/storage/images/" + b"a" * 65536)
    with pytest.raises(URITooLong):
        request_name(b"/var/s/storage/images/" + b"a" * 5000)


def test_var_dir_restricts() -> None:
    assert (
        request_name(b"/var/a/storage/images/x.jpg", "var/a").name == "var/a/storage/images/x.jpg"
    )
    with pytest.raises(NotFound):
        request_name(b"/var/b/storage/images/x.jpg", "var/a")
    with pytest.raises(NotFound):
        request_name(b"/var/storage/images/x.jpg", "var/a")
    assert request_name(b"/var/storage/images/x.jpg", "var").var_dir == "var"
