"""Where drift alerts go: a structured log line, in-process hooks, a webhook, a retraining capture.

None of them may slow a request: the log line and hooks are cheap and synchronous; the webhook and
the capture hand their work to a background task or thread and drop it (counted) when backed up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.request
from typing import Callable

import numpy as np

log = logging.getLogger("gateway.drift.alerts")

WEBHOOK_QUEUE = 1000
WEBHOOK_ATTEMPTS = 4
WEBHOOK_TIMEOUT_S = 2.0


class LogSink:
    def __call__(self, alert: dict) -> None:
        log.warning("drift %s", json.dumps(alert, sort_keys=True))


class WebhookSink:
    """POSTs each alert as JSON, retried with exponential backoff, from a background task."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"<WebhookSink {self.url} sent={self.sent} failed={self.failed} dropped={self.dropped}>"

    def start(self) -> None:
        self._queue = asyncio.Queue(WEBHOOK_QUEUE)
        self._task = asyncio.ensure_future(self._run())

    def __call__(self, alert: dict) -> None:
        if self._queue is None:
            return
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.dropped += 1

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:
            response.read()

    async def _run(self) -> None:
        while True:
            alert = await self._queue.get()
            body = json.dumps(alert, sort_keys=True).encode()
            for attempt in range(WEBHOOK_ATTEMPTS):
                try:
                    await asyncio.to_thread(self._post, body)
                    self.sent += 1
                    break
                except Exception as error:  # any failure of the receiver is retried, then counted
                    if attempt == WEBHOOK_ATTEMPTS - 1:
                        self.failed += 1
                        log.warning("drift webhook %s failed after %d attempts: %r", self.url, WEBHOOK_ATTEMPTS, error)
                    else:
                        await asyncio.sleep(0.2 * 2**attempt)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class CaptureSink:
    """Writes the evidence of each raised alert for retraining: report.json and sample.npz.

    `evidence(model)` returns (report dict, {tensor: rows}) at the moment of the alert; the files
    are written by a worker thread, never on the request path.
    """

    def __init__(self, directory: str, evidence: Callable[[str], tuple[dict, dict]]) -> None:
        self.directory = directory
        self.evidence = evidence
        self.written: list[str] = []
        self.failed = 0
        self._writing: set[asyncio.Future] = set()  # captures handed to the thread, not yet on disk

    def __call__(self, alert: dict) -> None:
        if alert["level"] == "ok":
            return
        report, sample = self.evidence(alert["model"])
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(alert["time"])) + f"-{int(alert['time'] * 1000) % 1000:03d}"
        target = os.path.join(self.directory, alert["model"], f"{stamp}-{alert['tensor'].replace('/', '-')}-{alert['feature']}-{alert['statistic']}")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(target, alert, report, sample)
            return
        writing = loop.run_in_executor(None, self._write, target, alert, report, sample)
        self._writing.add(writing)
        writing.add_done_callback(self._written)

    def _written(self, writing: asyncio.Future) -> None:
        self._writing.discard(writing)
        if not writing.cancelled() and writing.exception() is not None:
            self.failed += 1
            log.error("drift capture could not be written: %r", writing.exception())

    async def close(self) -> None:
        """Wait for the captures being written: an alert raised just before a stop keeps its evidence."""
        if self._writing:
            await asyncio.wait(set(self._writing))

    def _write(self, target: str, alert: dict, report: dict, sample: dict) -> None:
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "report.json"), "w", encoding="utf-8") as stream:
            json.dump({"alert": alert, "report": report}, stream, indent=1, sort_keys=True)
        np.savez_compressed(os.path.join(target, "sample.npz"), **{k.replace("/", "__"): v for k, v in sample.items()})
        self.written.append(target)
