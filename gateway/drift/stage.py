"""The drift stage: one ModelMonitor per configured model, fed by a pipeline observer; alert sinks."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np

from gateway.drift.config import DriftConfig, ModelDriftConfig
from gateway.drift.monitor import ModelMonitor
from gateway.drift.sinks import CaptureSink, LogSink, WebhookSink
from gateway.errors import ConfigError

log = logging.getLogger(__name__)

#: Finished requests wait at most this long to be counted, or until FLUSH_REQUESTS wait: they are
#: counted together (see DriftStage._pending_of). A drift window spans thousands of rows; 20 ms
#: later changes nothing a person reads, and the requests held meanwhile are bounded.
FLUSH_AFTER_S = 0.02
FLUSH_REQUESTS = 256


class DriftStage:
    """Watches the configured models. `hooks` receive every alert (the telemetry stage adds one).

    With `forward` (a worker of several, gateway/workers/), the stage only samples: each turn's
    sampled tensors go to `forward(model, groups, sampled)` instead of this process's windows, and
    the process that merges the workers counts them (`count_forwarded`), evaluates the windows and
    fires the alerts, once for all the traffic.
    """

    def __init__(self, config: DriftConfig, forward=None) -> None:
        self.config = config
        self.forward = forward
        self._alerts: list[dict] = []  # every alert so far, oldest first: read through alerts()
        self.observe_errors = 0
        self.serving: dict[str, dict] = {}  # model -> {"version", "digest"}: what a capture says was serving
        self._pending: dict = {}  # ModelMonitor -> [(request, response) or (batch request, response, requests)], as answered
        self._waiting = 0  # requests in _pending (a batch's count for a batch)
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_soon = False
        self.hooks: list = [self._alerts.append, LogSink()]
        self.webhook = WebhookSink(config.webhook) if config.webhook else None
        if self.webhook is not None:
            self.hooks.append(self.webhook)
        self.capture = CaptureSink(config.capture_dir, self._evidence) if config.capture_dir else None
        if self.capture is not None:
            self.hooks.append(self.capture)
        self.monitors = {
            model: ModelMonitor(model, model_config, self._emit, config.reservoir_rows)
            for model, model_config in config.models.items()
        }
        for model, model_config in config.models.items():
            self._load_reference(model, model_config)

    def __repr__(self) -> str:
        return f"<DriftStage models={sorted(self.monitors)} alerts={len(self._alerts)}>"

    def _emit(self, alert: dict) -> None:
        for hook in self.hooks:
            try:
                hook(alert)
            except Exception:  # a sink must never fail the request that closed the window
                log.exception("drift alert sink %r failed", hook)

    def _evidence(self, model: str) -> tuple[dict, dict]:
        monitor = self.monitors[model]
        report = dict(monitor.last_report or {})
        report["histograms"] = monitor.histograms()
        report["serving"] = self.serving.get(model)  # the version and package digest the rows were answered by
        return report, monitor.reservoir.arrays()

    def _load_reference(self, model: str, config: ModelDriftConfig) -> None:
        reference = config.reference
        monitor = self.monitors[model]
        if reference.profile:
            monitor.load_profile(json.loads(Path(reference.profile).read_text()))
        elif reference.file:
            self.load_reference_file(model, reference.file)

    def serving_version(self, model: str, version: str, digest: str | None, reference: Path | None) -> None:
        """The rollout's word on which version serves `model` (and its package digest); with the drift
        reference packaged with it, that becomes the model's reference (when the model is watched)."""
        self.serving[model] = {"version": version, "digest": digest}
        if reference is not None and model in self.monitors:
            self.load_reference_file(model, reference)
            log.info("drift reference of %s: the one packaged with version %s", model, version)

    def load_reference_file(self, model: str, path: str | Path) -> int:
        """Set input references from training rows: an .npz with one array per input name (what
        `tensorgate package --reference` stores with a package), or a .npy for the one tensor named
        in the model's `inputs`. Returns how many tensors it set."""
        self.flush()  # requests answered before the new reference are counted against the old one
        config = self.config.models[model]
        monitor = self.monitors[model]
        path = Path(path)
        if path.suffix == ".npz":
            with np.load(path) as arrays:
                for name in arrays.files:
                    monitor.tensor(name, "input").set_reference(self._features(config, name, arrays[name]))
                return len(arrays.files)
        names = config.inputs
        if len(names) != 1:
            raise ConfigError(f"drift.models.{model}.reference.file",
                              "a .npy reference needs exactly one tensor in `inputs`; use .npz for several")
        monitor.tensor(names[0], "input").set_reference(self._features(config, names[0], np.load(path)))
        return 1

    @staticmethod
    def _features(config: ModelDriftConfig, name: str, data: np.ndarray) -> np.ndarray:
        from gateway.drift.monitor import tensor_block

        data = np.ascontiguousarray(data)
        dtype = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}.get(data.dtype, "FP64")
        data = data.astype(np.float32 if dtype == "FP32" else np.float64)
        return tensor_block(dtype, data.shape, data.tobytes(), config.features.get(name, ()), config.reduction.get(name, "none"))

    def observer(self, exchange, response, error) -> None:
        """Pipeline observer: count the tensors of every successful request of a watched model."""
        if error is not None:
            return
        monitor = self.monitors.get(exchange.entry.name)
        if monitor is None or (exchange.merged and monitor.counts_whole_batches):
            return  # unwatched, or counted with the batch it rode in (batch_observer)
        self._pending_of(monitor).append((exchange.request, response))
        self._held(1)

    def batch_observer(self, batch, response) -> None:
        """Pipeline batch observer: a batch of a watched model counts as its requests would, at one
        lookup and one list append for the whole batch (when the model counts every request)."""
        monitor = self.monitors.get(batch.entry.name)
        if monitor is not None and monitor.counts_whole_batches:
            self._pending_of(monitor).append((batch.request, response, len(batch.members)))
            self._held(len(batch.members))

    def _pending_of(self, monitor) -> list:
        """The requests and batches of `monitor` waiting to be counted, in the order they were
        answered (which the reference's and the windows' boundaries follow). They are counted together,
        one compiled update per tensor (ModelMonitor.observe_many), FLUSH_AFTER_S after the first
        of them or once FLUSH_REQUESTS wait, whichever comes first: a count costs ~15 µs whatever
        its size, so counting every event-loop turn's few requests cost more than the counting."""
        pending = self._pending.get(monitor)
        if pending is None:
            pending = self._pending[monitor] = []
            if self._flush_timer is None:
                self._flush_timer = asyncio.get_running_loop().call_later(FLUSH_AFTER_S, self.flush)
        return pending

    def _held(self, requests: int) -> None:
        self._waiting += requests
        if self._waiting >= FLUSH_REQUESTS and not self._flush_soon:
            self._flush_soon = True  # after this request's own path, not on it
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Count every request and batch still waiting (readers of the windows call this first)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._flush_soon = False
        self._waiting = 0
        pending, self._pending = self._pending, {}
        for monitor, finished in pending.items():
            self._count(monitor, finished)

    def _count(self, monitor, finished: list) -> None:
        try:
            if self.forward is None:
                monitor.observe_many(finished)
            else:
                sampled_before = monitor.sampled
                groups = monitor.sample(finished)
                if groups:
                    self.forward(monitor.model, groups, monitor.sampled - sampled_before)
        except Exception:  # drift bookkeeping must never fail the requests it watches
            self.observe_errors += 1
            if self.observe_errors == 1 or self.observe_errors % 1000 == 0:
                log.exception("drift monitor of model '%s' failed (%d times)", monitor.model, self.observe_errors)

    def count_forwarded(self, model: str, groups: dict, sampled: int) -> None:
        """Count a worker's sampled tensors of `model` (what its `forward` was given) here."""
        monitor = self.monitors.get(model)
        if monitor is None:
            return
        monitor.sampled += sampled
        try:
            monitor.count(groups)
        except Exception:
            self.observe_errors += 1
            if self.observe_errors == 1 or self.observe_errors % 1000 == 0:
                log.exception("drift monitor of model '%s' failed (%d times)", model, self.observe_errors)

    def report(self, model: str) -> dict:
        self.flush()
        monitor = self.monitors[model]
        report = dict(monitor.last_report or {"model": model, "windows_evaluated": 0, "features": []})
        report["histograms"] = monitor.histograms()
        report["alerts"] = self.alerts(model)
        return report

    def alerts(self, model: str | None = None) -> list[dict]:
        """The alerts so far (raised and cleared), oldest first, of `model` or of every model. The
        requests still waiting to be counted are counted first: an alert their windows raise is in."""
        self.flush()
        return [a for a in self._alerts if model is None or a["model"] == model]

    async def start(self) -> None:
        if self.forward is not None:
            return  # a worker only samples: the kernels and the sinks run where the windows are
        from gateway.ext import drift as kernels

        # Compile (or load from the disk cache) every kernel now, never on a request.
        seconds = await asyncio.to_thread(kernels.warm_up)
        log.info("drift kernels ready in %.2f s", seconds)
        if self.webhook is not None:
            self.webhook.start()

    async def close(self) -> None:
        self.flush()
        if self.capture is not None:
            await self.capture.close()
        if self.webhook is not None:
            await self.webhook.close()
