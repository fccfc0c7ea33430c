"""Strict decoding of what a client sends: a form, a query string or JSON text.

Werkzeug's own form parser is lenient: an undecodable byte in a urlencoded body makes it drop
the whole form silently (a continue then reads as "tools is required"), and in a multipart
field it becomes U+FFFD. Here every field name and value must be UTF-8, else the request is a
400 naming the field; and decoded JSON text may not hold a lone surrogate (`"\\udc00"` is valid
JSON but no store can encode it).
"""

from __future__ import annotations

import io
from typing import IO, Any
from urllib.parse import unquote_to_bytes

from flask import Request
from werkzeug.formparser import FormDataParser, MultiPartParser
from werkzeug.sansio.multipart import Data, Epilogue, Field, MultipartDecoder, NeedData

from app.errors import ApiError

NOT_UTF8_BODY = "The request body is not valid UTF-8"


def not_utf8(where: str) -> ApiError:
    return ApiError(400, f"{where} is not valid UTF-8", "BAD_REQUEST")


def check_query(raw: bytes) -> None:
    """Every name and value of a query string decodes as UTF-8 (400 naming it otherwise)."""
    for name, value in _pairs(raw):
        _decode_pair(name, value, "The query parameter")


def _pairs(raw: bytes) -> list[tuple[bytes, bytes]]:
    pairs = []
    for part in raw.split(b"&"):
        if part:
            name, _, value = part.partition(b"=")
            pairs.append((_unquote(name), _unquote(value)))
    return pairs


def _unquote(text: bytes) -> bytes:
    return unquote_to_bytes(text.replace(b"+", b" "))


def _decode_pair(name: bytes, value: bytes, kind: str) -> tuple[str, str]:
    try:
        decoded_name = name.decode("utf-8")
    except UnicodeDecodeError:
        raise not_utf8(f"{kind} name {name.decode('utf-8', 'replace')!r}") from None
    try:
        return decoded_name, value.decode("utf-8")
    except UnicodeDecodeError:
        raise not_utf8(f"{kind} {decoded_name}") from None


class _StrictMultiPartParser(MultiPartParser):
    """Checks every text field's bytes strictly, then lets Werkzeug parse as usual."""

    def parse(self, stream: IO[bytes], boundary: bytes, content_length: int | None) -> Any:
        data = stream.read()
        _check_multipart(data, boundary)
        return super().parse(io.BytesIO(data), boundary, content_length)


def _check_multipart(data: bytes, boundary: bytes) -> None:
    decoder = MultipartDecoder(boundary)
    decoder.receive_data(data)
    decoder.receive_data(None)
    field, chunks = None, []
    event = _next(decoder)
    while not isinstance(event, Epilogue | NeedData):
        if isinstance(event, Field):
            field, chunks = event, []
        elif isinstance(event, Data) and field is not None:
            chunks.append(event.data)
            if not event.more_data:
                name = field.name or ""  # a part whose name could not be read has none
                _decode_pair(name.encode("utf-8", "surrogateescape"), b"".join(chunks),
                             "The form field")
                field = None
        else:
            field = None  # a file part: bytes, not text
        event = _next(decoder)


def _next(decoder: MultipartDecoder) -> Any:
    try:
        return decoder.next_event()
    except UnicodeDecodeError:
        raise not_utf8("The header of a form part") from None


class _StrictFormDataParser(FormDataParser):
    """urlencoded and multipart bodies whose every field is UTF-8, or a 400 naming it."""

    def _parse_urlencoded(self, stream: IO[bytes], mimetype: str,
                          content_length: int | None, options: dict[str, str]) -> Any:
        raw = stream.read()
        items = [_decode_pair(name, value, "The form field") for name, value in _pairs(raw)]
        return stream, self.cls(items), self.cls()

    def _parse_multipart(self, stream: IO[bytes], mimetype: str,
                         content_length: int | None, options: dict[str, str]) -> Any:
        parser = _StrictMultiPartParser(
            stream_factory=self.stream_factory, max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts, cls=self.cls)
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files


class StrictRequest(Request):
    """Flask's request with the strict form parser (a 400 raises through `request.form`)."""

    form_data_parser_class = _StrictFormDataParser


def lone_surrogate_at(value: Any, path: str) -> str | None:
    """The path of the first string (key or value) in decoded JSON holding a lone surrogate."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _encodable(key):
                    return where
                stack.append((child, f"{where}.{key}"))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
