"""An asynchronous, bounded metric buffer between the training loop and MLflow.

One synchronous `mlflow.log_metric` to a local tracking server costs tens of
milliseconds, and a slow or unreachable server would stall the step that logs. Rank 0
therefore logs through a `MetricBuffer`: `log_metrics` timestamps the points and
appends them to a bounded queue in microseconds; one daemon thread sends them with
`log_batch`, retrying with exponential backoff for as long as the server is down.
Points keep their original timestamp and step, so a history written after an outage
is the same history, in the same order, with the same values.

MLflow's own asynchronous logging (`synchronous=False`) is not used: its queue is
unbounded and a batch that fails is reported and forgotten, not retried.

    buffer = MetricBuffer(uri, run_id)
    buffer.log_metrics({"train/loss": 2.31, "train/lr": 3e-4}, step=100)
    ...
    counts = buffer.close()  # {"delivered": n, "dropped": n, "undelivered": n}

Delivery is at least once: a batch whose reply was lost is sent again. MLflow's SQL
stores ignore a metric identical to one already stored (same key, timestamp, step and
value), so each point appears once in the run's history.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

_log = logging.getLogger(__name__)

DROPPED_METRIC = "tracking/dropped_points"
INCOMPLETE_TAG = "attnpipe.tracking.incomplete"

# The sender's own patience. MLflow's REST client retries a failed request up to
# MLFLOW_HTTP_REQUEST_MAX_RETRIES=7 times with backoff factor 2 and waits up to
# MLFLOW_HTTP_REQUEST_TIMEOUT=120 s per attempt: minutes inside one call. The buffer
# retries by itself, so its requests make one attempt each with a short timeout, which
# keeps close() within its deadline and lets a restarted server be noticed quickly.
REQUEST_TIMEOUT_S = 5.0
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 4.0

# A server that answers with one of these will answer the same way again (a deleted
# run, an invalid value): the batch is dropped and counted, not retried forever.
_REJECTED = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"})

# sends one batch: (metrics, tags, timeout in seconds) -> None, raising on failure
Sender = Callable[[list[Metric], list[RunTag], float], None]


def _sender_for(tracking_uri: str, run_id: str) -> Sender:
    """How batches reach `tracking_uri`.

    A tracking server (http, https) gets a LogBatch request through MLflow's own
    `http_request`, which takes the retry count and timeout as arguments. MlflowClient
    has no per-call knob for them: only the process-wide environment variables above,
    and changing those from this thread would change every other MLflow call in the
    process. Any other URI (sqlite, postgresql, file) is written by MlflowClient.
    """
    from mlflow.tracking import MlflowClient

    if urlparse(tracking_uri).scheme in ("http", "https"):
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.proto_json_utils import message_to_json
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        endpoint = "/api/2.0/mlflow/runs/log-batch"  # MLflow REST API: runs/log-batch

        def send_rest(metrics: list[Metric], tags: list[RunTag], timeout: float) -> None:
            request = LogBatch(
                run_id=run_id,
                metrics=[m.to_proto() for m in metrics],
                tags=[t.to_proto() for t in tags],
            )
            response = http_request(
                get_default_host_creds(tracking_uri),  # per call: credentials may rotate
                endpoint,
                "POST",
                max_retries=0,
                timeout=timeout,
                json=json.loads(message_to_json(request)),  # as MLflow's RestStore sends it
            )
            verify_rest_response(response, endpoint)

        return send_rest

    client = MlflowClient(tracking_uri)

    def send_client(metrics: list[Metric], tags: list[RunTag], timeout: float) -> None:
        client.log_batch(run_id, metrics=metrics, tags=tags)

    return send_client


def _check_key(key: str) -> None:
    """The checks MLflow applies to a metric name, at the call that logs it: a bad key
    would otherwise be refused by the server later, far from the line that wrote it."""
    from mlflow.utils.validation import _validate_metric_name

    if not isinstance(key, str):
        raise TypeError(f"metric name must be a str, got {type(key).__name__}: {key!r}")
    _validate_metric_name(key)


class MetricBuffer:
    """A bounded queue of metric points and one thread that delivers them to one run.

    `log_metrics` never blocks on and never raises because of the tracking server.
    When the queue holds `capacity` points, the oldest queued points make room for new
    ones and are counted in `dropped`. `close` delivers what is left, within a timeout.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        capacity: int = 10_000,
        flush_interval: float = 1.0,
        max_batch: int = 1000,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if not 1 <= max_batch <= 1000:  # MLflow's log_batch takes at most 1000 metrics
            raise ValueError(f"max_batch must be between 1 and 1000, got {max_batch}")
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be positive, got {flush_interval}")
        self._send = _sender_for(tracking_uri, run_id)
        self._capacity = capacity
        self._flush_interval = flush_interval
        self._max_batch = max_batch

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[Metric] = deque(maxlen=capacity)
        # Sequence number of the point at the queue's head. The sender removes a batch
        # only once it is delivered, and by number, because the producer may evict
        # some of those very points while the batch is in flight.
        self._head = 0
        self._dropped = 0
        self._delivered = 0
        self._last_step = 0
        self._keys: set[str] = set()

        self._closing = threading.Event()
        self._deadline = float("inf")  # time.monotonic() by which close() must return
        self._result: dict[str, int] | None = None
        self._thread = threading.Thread(target=self._run, name="metric-buffer", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Points lost without delivery: evicted from a full queue, or refused by the
        server as invalid."""
        return self._dropped

    @property
    def delivered(self) -> int:
        """Points the tracking store has acknowledged."""
        return self._delivered

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue one point per metric, stamped now with `step`; returns at once.

        Raises only for the caller's own mistakes (a closed buffer, a name MLflow
        refuses, a value that is not a number), never because of the server.
        """
        if self._closing.is_set():
            raise RuntimeError("MetricBuffer.log_metrics after close()")
        timestamp_ms = int(time.time() * 1000)
        step = int(step)
        points = []
        for key, value in metrics.items():
            if key not in self._keys:
                _check_key(key)
                self._keys.add(key)
            points.append(Metric(key, float(value), timestamp_ms, step))
        with self._lock:
            evicted = len(self._queue) + len(points) - self._capacity
            self._queue.extend(points)  # the deque's maxlen evicts from the left
            if evicted > 0:
                self._head += evicted
                self._dropped += evicted
            self._last_step = step
            if len(self._queue) >= self._max_batch:
                self._wake.notify()

    def close(self, timeout: float = 30.0) -> dict[str, int]:
        """Deliver what is queued, retrying while the server is down, for at most
        `timeout` seconds; stop the thread; return the counts.

        If any point was dropped or is still undelivered, the run gets a metric
        `tracking/dropped_points` (their sum) and a tag saying so, when the server
        takes them. "undelivered" counts points not acknowledged by the deadline.
        Closing twice returns the first result.
        """
        if self._result is not None:
            return self._result
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        with self._wake:
            self._wake.notify()
        # The thread stops by the deadline, unless a request is still in flight: a
        # daemon, it is then left to finish or die with the process.
        self._thread.join(max(0.0, self._deadline - time.monotonic()) + 0.1)
        self._result = self._counts()
        if self._thread.is_alive():
            _log.warning("metric buffer: a request was still in flight at close()")
        return self._result

    def __enter__(self) -> MetricBuffer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "delivered": self._delivered,
                "dropped": self._dropped,
                "undelivered": len(self._queue),
            }

    def _remaining(self) -> float:
        return self._deadline - time.monotonic()

    def _run(self) -> None:
        failures = 0
        while True:
            if failures:
                pause = min(BACKOFF_FIRST_S * 2 ** (failures - 1), BACKOFF_MAX_S)
                if self._closing.is_set():
                    time.sleep(max(0.0, min(pause, self._remaining())))
                else:
                    self._closing.wait(pause)  # close() cuts the pause short
            else:
                with self._wake:
                    self._wake.wait_for(
                        lambda: self._closing.is_set() or len(self._queue) >= self._max_batch,
                        timeout=self._flush_interval,
                    )
            with self._lock:
                first = self._head
                batch = list(itertools.islice(self._queue, self._max_batch))
            if self._closing.is_set() and (not batch or self._remaining() <= 0):
                break
            if not batch:
                continue
            try:
                self._send(batch, [], self._request_timeout())
            except MlflowException as e:
                if e.error_code in _REJECTED:
                    _log.error("metric buffer: server refused %d points: %s", len(batch), e)
                    self._retire(first, len(batch), delivered=False)
                    continue
                failures = self._failed(failures, e)
            except Exception as e:  # network errors, a locked database: retry
                failures = self._failed(failures, e)
            else:
                if failures:
                    _log.warning("metric buffer: tracking store reachable again")
                failures = 0
                self._retire(first, len(batch), delivered=True)
        self._report()

    def _request_timeout(self) -> float:
        return max(0.5, min(REQUEST_TIMEOUT_S, self._remaining()))

    def _failed(self, failures: int, error: Exception) -> int:
        if failures == 0:
            _log.warning("metric buffer: tracking store unreachable, buffering: %s", error)
        return failures + 1

    def _retire(self, first: int, count: int, delivered: bool) -> None:
        """Remove points [first, first + count) from the queue once they are settled.
        Those the producer already evicted during the request were counted as dropped;
        if the request delivered them, they move to delivered."""
        end = first + count
        with self._lock:
            evicted_meanwhile = max(0, min(self._head, end) - first)
            for _ in range(max(0, end - self._head)):
                self._queue.popleft()
            self._head = max(self._head, end)
            if delivered:
                self._delivered += count
                self._dropped -= evicted_meanwhile
            else:
                self._dropped += count - evicted_meanwhile

    def _report(self) -> None:
        """Mark the run as incomplete if it is, while time remains."""
        counts = self._counts()
        lost = counts["dropped"] + counts["undelivered"]
        if not lost:
            return
        _log.warning(
            "metric buffer: %d points dropped, %d undelivered",
            counts["dropped"],
            counts["undelivered"],
        )
        if self._remaining() <= 0:
            return
        metric = Metric(DROPPED_METRIC, float(lost), int(time.time() * 1000), self._last_step)
        tag = RunTag(
            INCOMPLETE_TAG,
            f"{counts['dropped']} metric points dropped (buffer full or refused), "
            f"{counts['undelivered']} undelivered at close",
        )
        try:
            self._send([metric], [tag], self._request_timeout())
        except Exception as e:
            _log.warning("metric buffer: could not record the loss in the run: %s", e)
