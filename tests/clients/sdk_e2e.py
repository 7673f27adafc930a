"""Segment's and RudderStack's Python libraries, unmodified, against a live gateway.

Run by tests/api/sdk_clients.rs as `python3 sdk_e2e.py <gateway address> <write key>`.
Prints one JSON report on its last line; exits 1 when a library reported a failure.
"""
import gzip
import json
import sys

import rudderstack.analytics.request as rudder_request
from rudderstack.analytics.client import Client as RudderClient
from segment.analytics import Client as SegmentClient

host, write_key = sys.argv[1], sys.argv[2]
failures = []
report = {"failures": failures, "rudder_requests": []}


def on_error(error, items):
    failures.append({"error": repr(error), "ids": [i.get("messageId") for i in items]})


# Every request rudder-sdk-python makes, as the gateway received it: the inflated size of
# the (gzip) body, the events in it, the status and the answer.
_post = rudder_request._session.post


def recording_post(url, **kwargs):
    body = kwargs["data"]
    if kwargs["headers"].get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    response = _post(url, **kwargs)
    report["rudder_requests"].append({
        "bytes": len(body),
        "events": len(json.loads(body)["batch"]),
        "status": response.status_code,
        "answer": response.json() if response.content else None,
    })
    return response


rudder_request._session.post = recording_post

# 1. Segment's analytics-python 2.4: destination selection with `integrations`.
segment = SegmentClient(write_key, host=host, sync_mode=True, on_error=on_error, max_retries=0)
segment.track("seg-off", "Not For Refiner", integrations={"Refiner": False},
              message_id="seg-off")
segment.track("seg-alloff", "Not For Anyone", integrations={"All": False},
              message_id="seg-alloff")
segment.track("seg-on", "Selected", integrations={"All": False, "Refiner": True},
              message_id="seg-on")

# 2. rudder-sdk-python 2.1: identify traits travel in context.traits only.
rudder = RudderClient(write_key, host=host, sync_mode=True, on_error=on_error, max_retries=0)
rudder.identify("rud-ctx", {"email": "rud@example.com", "plan": "pro",
                            "createdAt": "2024-05-01T10:00:00Z"}, message_id="rud-ctx")

# 3. A ~4 MB batch: 130 events of ~30 KB in one gzip request (the library closes a batch at
#    upload_size events or 4 MiB).
big = RudderClient(write_key, host=host, on_error=on_error, max_retries=0,
                   upload_size=130, upload_interval=3)
blob = "x" * 30_000
for i in range(130):
    big.track("rud-big", "Bulk %03d" % i, properties={"blob": blob, "i": i},
              message_id="rud-big-%03d" % i)
big.flush()
big.join()

# 4. One oversized event (40 KB: the library sends events up to 4 MB) between two good ones.
mixed = RudderClient(write_key, host=host, on_error=on_error, max_retries=0,
                     upload_size=3, upload_interval=3)
mixed.track("rud-mixed", "Before", message_id="rud-mixed-before")
mixed.track("rud-mixed", "Huge", properties={"blob": "y" * 40_000},
            message_id="rud-mixed-huge")
mixed.track("rud-mixed", "After", message_id="rud-mixed-after")
mixed.flush()
mixed.join()

print(json.dumps(report))
sys.exit(1 if failures else 0)
