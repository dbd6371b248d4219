"""Headless Chromium driven over the DevTools protocol on a pipe: open a local page, ask it
questions in JavaScript, list every request it made, take a screenshot.

No driver, no websocket, no package: Chromium started with `--remote-debugging-pipe` reads
protocol commands from file descriptor 3 and writes replies and events to descriptor 4,
each message one JSON document ended by a NUL byte. The page's screenshot command and the
page's browser test use this one client.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ENV = "CHROMIUM"  # a browser binary outside PATH
_COMMAND_FD, _REPLY_FD = 3, 4  # fixed by Chromium's --remote-debugging-pipe


def find_chromium() -> str | None:
    """The Chromium binary: $CHROMIUM if set (None if that is not an executable), else the
    first of CHROMIUM_NAMES on PATH."""
    if os.environ.get(CHROMIUM_ENV):
        return shutil.which(os.environ[CHROMIUM_ENV])
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


class HeadlessChromium:
    """One headless Chromium with one tab; use as a context manager.

    Args:
        width, height: the tab's viewport in CSS pixels.
        timeout: seconds to wait for any one reply or for a page to load.

    Raises:
        UserError: no Chromium is installed, or it does not answer.
    """

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 30.0) -> None:
        self.width, self.height, self.timeout = width, height, timeout
        self.requests: list[str] = []  # every URL the tab asked for since the last open()
        self._buffer = b""
        self._next_id = 0

    def __enter__(self) -> HeadlessChromium:
        binary = find_chromium()
        if binary is None:
            raise UserError(
                "no Chromium found (looked for $CHROMIUM and "
                f"{', '.join(CHROMIUM_NAMES)}); install it: apt-get install -y chromium"
            )
        self._profile = tempfile.mkdtemp(prefix="vlmf-chromium-")
        command_read, self._command = os.pipe()
        self._reply, reply_write = os.pipe()

        def wire_pipes() -> None:  # in the child, before exec: put the pipes on fds 3 and 4
            # first out of the way, so that placing one cannot close the other
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (command_read, reply_write)]
            os.dup2(high[0], _COMMAND_FD)
            os.dup2(high[1], _REPLY_FD)

        try:
            self._process = subprocess.Popen(
                [
                    binary,
                    "--headless",
                    "--no-sandbox",  # as root (CI, containers) Chromium refuses its sandbox
                    "--disable-gpu",
                    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-extensions",
                    "--disable-background-networking",  # no update or safe-browsing calls
                    "--hide-scrollbars",
                    f"--user-data-dir={self._profile}",
                    "--remote-debugging-pipe",
                    "about:blank",
                ],
                preexec_fn=wire_pipes,
                pass_fds=(_COMMAND_FD, _REPLY_FD),  # kept open: preexec_fn runs before fds close
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as error:
            for descriptor in (command_read, reply_write, self._command, self._reply):
                os.close(descriptor)
            shutil.rmtree(self._profile, ignore_errors=True)
            raise UserError(
                f"cannot start Chromium ({binary}): {error.strerror or error}"
            ) from None
        os.close(command_read)
        os.close(reply_write)
        try:
            target = self._call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)[
                "sessionId"
            ]
            for domain in ("Page", "Network", "Runtime"):
                self._call(f"{domain}.enable", session=True)
            self.set_viewport(self.width, self.height)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exception: object) -> None:
        try:
            if self._process.poll() is None:
                self._send("Browser.close", {})
                self._process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        finally:
            for descriptor in (self._command, self._reply):
                os.close(descriptor)
            shutil.rmtree(self._profile, ignore_errors=True)

    def open(self, page: Path) -> None:
        """Load a local file and wait for its load event (every image fetched or failed)."""
        self.requests = []
        sent = self._send("Page.navigate", {"url": page.resolve().as_uri()}, session=True)
        seen: dict[str, dict[str, Any]] = {}

        def loaded(message: dict[str, Any]) -> bool:
            # the load event may come before or after the reply to navigate: wait for both
            if message.get("id") == sent:
                seen["reply"] = message
            elif message.get("method") == "Page.loadEventFired":
                seen["load"] = message
            return len(seen) == 2

        self._wait(loaded, f"loading {page}")
        failure = seen["reply"].get("result", {}).get("errorText")
        if failure:
            raise UserError(f"Chromium could not open {page}: {failure}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values)."""
        reply = self._call(
            "Runtime.evaluate", session=True, expression=expression, returnByValue=True
        )
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression!r} raised {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def set_viewport(self, width: int, height: int) -> None:
        """Lay the page out in a window of this size (CSS pixels)."""
        self.width, self.height = width, height
        self._call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def emulate_media(self, media: str) -> None:
        """Lay the page out for `media` ("print", "screen") as a printer would see it."""
        self._call("Emulation.setEmulatedMedia", session=True, media=media)

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """Write a PNG of the viewport (or of the whole page) to `path`."""
        options: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
            )
            options |= {
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1},
            }
        data = self._call("Page.captureScreenshot", session=True, **options)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def _send(self, method: str, params: dict[str, Any], session: bool = False) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._command, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        sent = self._send(method, params, session)
        reply = self._wait(lambda message: message.get("id") == sent, method)
        if "error" in reply:
            raise RuntimeError(f"Chromium refused {method}: {reply['error']}")
        return reply.get("result", {})

    def _wait(self, wanted: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if message.get("method") == "Network.requestWillBeSent":
                    self.requests.append(message["params"]["request"]["url"])
                if wanted(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._reply], [], [], left)[0]:
                raise UserError(f"Chromium gave no answer to {what} within {self.timeout:g} s")
            chunk = os.read(self._reply, 1 << 20)
            if not chunk:
                raise UserError(f"Chromium exited while waiting for {what}")
            self._buffer += chunk
