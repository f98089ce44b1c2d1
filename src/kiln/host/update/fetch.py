"""HTTP transport for the TUF client: stdlib urllib, bounded in time as well as size.

python-tuf bounds how many bytes it reads; this fetcher also bounds how long a single
download may take, so a server that trickles one byte every few seconds cannot hold an
update command forever (TUF's "slow retrieval" attack). A body cut before its
Content-Length is a DownloadError (the network's fault, retried), so that a whole
response of the wrong length can be told apart as the server's lie.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

CHUNK = 1 << 20


class HttpFetcher(FetcherInterface):
    def __init__(self, *, socket_timeout: float = 15.0, min_rate: int = 64 * 1024, grace: float = 60.0) -> None:
        # A download may take `grace` seconds plus one second per `min_rate` bytes read.
        self.socket_timeout = socket_timeout
        self.min_rate = min_rate
        self.grace = grace

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(("http://", "https://")):
            raise exceptions.DownloadError(f"refusing to fetch {url}: only http:// and https:// are supported")
        request = urllib.request.Request(url, headers={"User-Agent": "kiln-update"})
        try:
            response = urllib.request.urlopen(request, timeout=self.socket_timeout)
        except urllib.error.HTTPError as e:
            raise exceptions.DownloadHTTPError(f"{url}: HTTP {e.code} {e.reason}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise exceptions.DownloadError(f"{url}: {reason}") from None
        return self._chunks(url, response)

    def _chunks(self, url: str, response: http.client.HTTPResponse) -> Iterator[bytes]:
        start = time.monotonic()
        read = 0
        try:
            while True:
                try:
                    chunk = response.read1(CHUNK)  # what has arrived: the deadline is checked often
                except (OSError, ValueError, http.client.HTTPException) as e:  # IncompleteRead: a cut chunked body
                    raise exceptions.DownloadError(
                        f"{url}: connection failed after {read} bytes: {type(e).__name__}: {e}"
                    ) from None
                if not chunk:
                    if response.length:  # closed before the end its Content-Length announced
                        raise exceptions.DownloadError(
                            f"{url}: connection closed after {read} bytes, {response.length} before the end"
                        )
                    return
                read += len(chunk)
                if time.monotonic() - start > self.grace + read / self.min_rate:
                    raise exceptions.SlowRetrievalError(
                        f"{url}: too slow ({read} bytes in {time.monotonic() - start:.0f} s)"
                    )
                yield chunk
        finally:
            response.close()
