"""Hooks for .ci/schemathesis: a request that says `Content-Encoding: gzip` sends a gzip body.

Schemathesis fills the documented `Content-Encoding` header but serializes bodies as they
are, so without this every such request would only test the 400 `invalid_gzip` answer. One
in four keeps its plain body, so that answer is still exercised.
"""

import gzip
import json
import zlib

import schemathesis
from schemathesis.core import NOT_SET


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = {name.lower(): value for name, value in (case.headers or {}).items()}
    encoding = str(headers.get("content-encoding", "")).strip().lower()
    if encoding not in ("gzip", "x-gzip") or case.body is NOT_SET:
        return
    if isinstance(case.body, (bytes, bytearray)):
        raw = bytes(case.body)
    elif isinstance(case.body, str):
        raw = case.body.encode("utf-8")
    else:
        raw = json.dumps(case.body).encode("utf-8")
    if zlib.crc32(raw) % 4 == 0:
        return
    kwargs["data"] = gzip.compress(raw)
