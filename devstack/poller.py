"""SQS → function, the way the input bucket's notifications reach the stills function.

Like a Lambda event source mapping, except that each message carries an S3 notification and
the function is invoked with that notification (the event an S3 trigger would deliver):
{"Records": [...]}. Success deletes the message; failure leaves it to come back after the
queue's visibility timeout (a short one in the stack, so retries are quick), and after
maxReceiveCount receives SQS moves it to the dead-letter queue. While an invocation runs, the
message's visibility is extended so a slow invocation is not delivered twice.
s3:TestEvent messages (sent when the notification is configured) are deleted unseen.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .events import is_test_event, normalize_s3_event
from .procs import DevstackError
from .runtime_api import InvokeResult

log = logging.getLogger("devstack.poller")


@dataclass
class Delivery:
    """One message taken from the queue: what was done with it."""
    message_id: str
    receive_count: int
    body: Any
    event: dict | None = None
    result: InvokeResult | None = None
    outcome: str = ""  # "ok" (deleted), "error" (left for redelivery), "skipped" (test event, not S3)
    at: float = field(default_factory=time.time)


class SqsS3Poller:
    def __init__(self, sqs_client: Any, queue_url: str, invoke: Callable[[dict], InvokeResult], *,
                 visibility_timeout: int = 2, wait_time_s: int = 1, normalize: bool = True):
        self.sqs = sqs_client
        self.queue_url = queue_url
        self.invoke = invoke
        self.visibility_timeout = visibility_timeout
        self.wait_time_s = wait_time_s
        self.normalize = normalize
        self.deliveries: list[Delivery] = []
        self._cv = threading.Condition()
        self._paused = False
        self._busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sqs-poller", daemon=True)
        self._thread.start()

    def signal_stop(self) -> None:
        """Take no more messages (the one in hand finishes); does not wait."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        self.signal_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self, wait: bool = True, timeout: float = 60.0) -> None:
        """Stop taking messages; with `wait`, return once the message in hand (if any) is done."""
        with self._cv:
            self._paused = True
            self._cv.notify_all()
            if wait:
                deadline = time.monotonic() + timeout
                while self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DevstackError(f"poller still busy after {timeout}s")
                    self._cv.wait(min(left, 0.2))

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def idle(self) -> bool:
        """No message in hand (the poller may be waiting on the queue)."""
        return not self._busy

    def wait_for(self, predicate: Callable[[list[Delivery]], bool], timeout: float) -> list[Delivery]:
        """Wait until `predicate(deliveries)` holds; returns the deliveries."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not predicate(list(self.deliveries)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DevstackError(f"timed out after {timeout}s waiting for deliveries; have "
                                        f"{[(d.outcome, d.message_id) for d in self.deliveries]}")
                self._cv.wait(min(left, 0.2))
            return list(self.deliveries)

    # -- the loop -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                if self._paused:
                    self._cv.wait(0.2)
                    continue
            try:
                self._poll_once()
            except Exception:  # noqa: BLE001 - moto down, a bad message: log, back off, go on
                log.exception("poller: error")
                self._stop.wait(0.5)

    def _poll_once(self) -> None:
        response = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=1,
                                            WaitTimeSeconds=self.wait_time_s,
                                            MessageSystemAttributeNames=["ApproximateReceiveCount"])
        for message in response.get("Messages", []):
            with self._cv:
                if self._paused or self._stop.is_set():  # paused while receiving: hand it back
                    hand_back = True
                else:
                    hand_back = False
                    self._busy = True
            if hand_back:
                self._change_visibility(message["ReceiptHandle"], 0)
                continue
            try:
                self._handle(message)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _handle(self, message: dict) -> None:
        receipt = message["ReceiptHandle"]
        count = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        try:
            body = json.loads(message["Body"])
        except ValueError:
            body = message["Body"]
        delivery = Delivery(message["MessageId"], count, body)
        if is_test_event(body) or not (isinstance(body, dict) and isinstance(body.get("Records"), list)):
            if not is_test_event(body):
                log.warning("poller: not an S3 notification, deleted: %.200s", message["Body"])
            self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=receipt)
            delivery.outcome = "skipped"
            self._record(delivery)
            return
        event = normalize_s3_event(body) if self.normalize else body
        delivery.event = event
        done = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(receipt, done), daemon=True)
        heartbeat.start()
        try:
            result = self.invoke(event)
        finally:
            done.set()
            heartbeat.join(5)
        delivery.result = result
        if result.ok:
            self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=receipt)
            delivery.outcome = "ok"
        else:
            # visible again after the (short) visibility timeout: the retry
            self._change_visibility(receipt, self.visibility_timeout)
            delivery.outcome = "error"
            log.info("poller: invocation failed (%s), message %s left for redelivery",
                     result.error_type, message["MessageId"])
        self._record(delivery)

    def _heartbeat(self, receipt: str, done: threading.Event) -> None:
        interval = max(0.5, self.visibility_timeout / 2)
        while not done.wait(interval):
            self._change_visibility(receipt, self.visibility_timeout + 1)

    def _change_visibility(self, receipt: str, seconds: int) -> None:
        try:
            self.sqs.change_message_visibility(QueueUrl=self.queue_url, ReceiptHandle=receipt,
                                               VisibilityTimeout=int(seconds))
        except Exception:  # noqa: BLE001 - the message may have gone to the DLQ meanwhile
            log.debug("poller: change_message_visibility failed", exc_info=True)

    def _record(self, delivery: Delivery) -> None:
        with self._cv:
            self.deliveries.append(delivery)
            self._cv.notify_all()
