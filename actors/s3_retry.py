"""s3fs's retry of transient S3 answers, set once per process (driver, Ray workers, decode children).

s3fs retries (its `retries`, default 5, with backoff) timeouts, dropped connections and errors whose text
says SlowDown; botocore's standard mode retries 5xx itself. A 5xx to a HEAD request has no body, so after
botocore gives up s3fs would not retry it: this handler (s3fs's own hook, `set_custom_error_handler`) makes
s3fs retry every throttling or 5xx answer too. Lives in `actors` so both the model actors and `pipeline` use it.
"""
from __future__ import annotations

TRANSIENT_STATUS = (500, 502, 503, 504)
TRANSIENT_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "503", "500", "502", "504")
_installed = False


def is_transient(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(response.get("Error", {}).get("Code", ""))
    return status in TRANSIENT_STATUS or code in TRANSIENT_CODES


def install() -> None:
    global _installed
    if _installed:
        return
    try:
        import s3fs.core
    except ImportError:  # no object storage in this environment
        return
    s3fs.core.set_custom_error_handler(is_transient)
    _installed = True
