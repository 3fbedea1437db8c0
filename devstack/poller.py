"""Queues → functions: the two ways Lambda delivers events, played on moto's SQS.

`AsyncPoller` is Lambda's asynchronous invocation (how S3 and SNS invoke a function): each
message on a devstack queue carries one event (an S3 notification, normalised to S3's shape,
or an SNS envelope, turned into the SNS event), and the function is invoked with it. Success
deletes the message; a failure leaves it to come back after the queue's (short) visibility
timeout: the retry. After `max_attempts` (1 + the function's MaximumRetryAttempts) the event
goes to the on-failure destination as Lambda's record ({"requestContext": {"condition":
"RetriesExhausted", "approximateInvokeCount"}, "requestPayload", "responsePayload"}) and the
message is deleted. s3:TestEvent messages (sent when a notification is configured) are
deleted unseen.

`SqsEventSource` is an SQS event source mapping: batches of up to BatchSize messages as an
SQS event; with ReportBatchItemFailures only the reported items stay on the queue, otherwise a
failed invocation leaves the whole batch. They come back after the visibility timeout, and
the queue's own redrive policy (moto implements it) moves a message to its dead-letter queue
after maxReceiveCount receives.

While an invocation runs, the messages' visibility is extended so a slow invocation is not
delivered twice.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from .events import is_test_event, normalize_s3_event
from .procs import DevstackError
from .runtime_api import InvokeResult

log = logging.getLogger("devstack.poller")


@dataclass
class Delivery:
    """One message taken from the queue: what was done with it."""
    message_id: str
    receive_count: int  # SQS: the receive; asynchronous invocations: the attempt (1, 2, 3)
    body: Any
    event: dict | None = None
    result: InvokeResult | None = None
    outcome: str = ""  # "ok" (deleted), "error" (left for redelivery), "skipped" (test event, not S3)
    at: float = field(default_factory=time.time)
    gave_up: bool = False  # the last attempt failed: sent to the on-failure destination


class AsyncPoller:
    """Asynchronous invocations of one function from one devstack queue (see the module doc).
    `kind` is "s3" (messages are S3 notifications) or "sns" (SNS envelopes)."""

    def __init__(self, sqs_client: Any, queue_url: str, invoke: Callable[[dict], InvokeResult], *,
                 visibility_timeout: int = 2, wait_time_s: int = 1, normalize: bool = True,
                 kind: str = "s3", max_attempts: int | None = None, on_failure_url: str | None = None,
                 function_arn: str = "", name: str = "sqs-poller"):
        self.sqs = sqs_client
        self.queue_url = queue_url
        self.invoke = invoke
        self.visibility_timeout = visibility_timeout
        self.wait_time_s = wait_time_s
        self.normalize = normalize
        self.kind = kind
        self.max_attempts = max_attempts
        self.on_failure_url = on_failure_url
        self.function_arn = function_arn
        self.name = name
        self._handed_back: dict[str, int] = {}  # message id → receives handed back while paused
        self.deliveries: list[Delivery] = []
        self._cv = threading.Condition()
        self._paused = False
        self._busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
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
                # a receive, but no attempt: Lambda counts invocations
                self._handed_back[message["MessageId"]] = self._handed_back.get(message["MessageId"], 0) + 1
                continue
            try:
                self._handle(message)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _handle(self, message: dict) -> None:
        receipt = message["ReceiptHandle"]
        count = (int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
                 - self._handed_back.get(message["MessageId"], 0))
        try:
            body = json.loads(message["Body"])
        except ValueError:
            body = message["Body"]
        delivery = Delivery(message["MessageId"], count, body)
        event = self._event(body)
        if event is None:
            if not is_test_event(body):
                log.warning("%s: not a %s event, deleted: %.200s", self.name, self.kind, message["Body"])
            self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=receipt)
            delivery.outcome = "skipped"
            self._record(delivery)
            return
        delivery.event = event
        done = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=([receipt], done), daemon=True)
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
        elif self.max_attempts is not None and count >= self.max_attempts:
            # Lambda's retries are spent: the on-failure destination gets the record
            if self.on_failure_url:
                self.sqs.send_message(QueueUrl=self.on_failure_url,
                                      MessageBody=json.dumps(self.destination_record(event, result, count)))
            self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=receipt)
            delivery.outcome = "error"
            delivery.gave_up = True
            log.info("%s: invocation failed %d times (%s); sent to the on-failure destination",
                     self.name, count, result.error_type)
        else:
            # visible again after the (short) visibility timeout: the retry
            self._change_visibility(receipt, self.visibility_timeout)
            delivery.outcome = "error"
            log.info("%s: invocation failed (%s), message %s left for redelivery",
                     self.name, result.error_type, message["MessageId"])
        self._record(delivery)

    def _event(self, body: Any) -> dict | None:
        """The event the function is invoked with, or None for a message to drop."""
        if self.kind == "sns":
            return sns_event(body) if isinstance(body, dict) and body.get("Type") == "Notification" else None
        if is_test_event(body) or not (isinstance(body, dict) and isinstance(body.get("Records"), list)):
            return None
        return normalize_s3_event(body) if self.normalize else body

    def destination_record(self, event: dict, result: InvokeResult, attempts: int) -> dict:
        """Lambda's on-failure destination record for an asynchronous invocation."""
        return {"version": "1.0", "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "requestContext": {"requestId": result.request_id, "functionArn": f"{self.function_arn}:$LATEST",
                                   "condition": "RetriesExhausted", "approximateInvokeCount": attempts},
                "requestPayload": event,
                "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
                "responsePayload": result.error}

    def _heartbeat(self, receipts: list[str], done: threading.Event) -> None:
        interval = max(0.5, self.visibility_timeout / 2)
        while not done.wait(interval):
            for receipt in receipts:
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


SqsS3Poller = AsyncPoller  # the stills function's S3 trigger, its first use


def sns_event(envelope: dict, subscription: str = "devstack") -> dict:
    """The Lambda event for one SNS notification (as delivered to an SQS subscription)."""
    topic = envelope.get("TopicArn", "")
    sns = {"Type": "Notification", "MessageId": envelope.get("MessageId") or str(uuid.uuid4()), "TopicArn": topic,
           "Subject": envelope.get("Subject"), "Message": envelope.get("Message", ""),
           "Timestamp": envelope.get("Timestamp") or datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
           "SignatureVersion": envelope.get("SignatureVersion", "1"), "Signature": envelope.get("Signature", "EXAMPLE"),
           "SigningCertUrl": envelope.get("SigningCertURL", ""), "UnsubscribeUrl": envelope.get("UnsubscribeURL", ""),
           "MessageAttributes": envelope.get("MessageAttributes") or {}}
    return {"Records": [{"EventSource": "aws:sns", "EventVersion": "1.0",
                         "EventSubscriptionArn": f"{topic}:{subscription}", "Sns": sns}]}


class SqsEventSource(AsyncPoller):
    """An SQS event source mapping (see the module doc): batches of messages as SQS events."""

    def __init__(self, sqs_client: Any, queue_url: str, queue_arn: str, invoke: Callable[[dict], InvokeResult], *,
                 batch_size: int = 10, report_batch_item_failures: bool = False, visibility_timeout: int = 2,
                 region: str = "us-east-1", name: str = "sqs-event-source"):
        super().__init__(sqs_client, queue_url, invoke, visibility_timeout=visibility_timeout, name=name)
        self.queue_arn = queue_arn
        self.batch_size = max(1, min(10, batch_size))
        self.report_batch_item_failures = report_batch_item_failures
        self.region = region

    def _poll_once(self) -> None:
        response = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=self.batch_size,
                                            WaitTimeSeconds=self.wait_time_s, MessageSystemAttributeNames=["All"])
        messages = response.get("Messages", [])
        if not messages:
            return
        with self._cv:
            hand_back = self._paused or self._stop.is_set()
            self._busy = not hand_back
        if hand_back:
            for message in messages:
                self._change_visibility(message["ReceiptHandle"], 0)
            return
        try:
            self._handle_batch(messages)
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _record_of(self, message: dict) -> dict:
        attributes = message.get("Attributes", {})
        return {"messageId": message["MessageId"], "receiptHandle": message["ReceiptHandle"], "body": message["Body"],
                "attributes": {name: attributes[name] for name in (
                    "ApproximateReceiveCount", "SentTimestamp", "SenderId", "ApproximateFirstReceiveTimestamp")
                    if name in attributes},
                "messageAttributes": {}, "md5OfBody": message.get("MD5OfBody", ""), "eventSource": "aws:sqs",
                "eventSourceARN": self.queue_arn, "awsRegion": self.region}

    def _handle_batch(self, messages: list[dict]) -> None:
        event = {"Records": [self._record_of(m) for m in messages]}
        done = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=([m["ReceiptHandle"] for m in messages], done),
                                     daemon=True)
        heartbeat.start()
        try:
            result = self.invoke(event)
        finally:
            done.set()
            heartbeat.join(5)
        failed: set[str] = {m["MessageId"] for m in messages}
        if result.ok:
            reported = (result.payload or {}).get("batchItemFailures") if isinstance(result.payload, dict) else None
            failed = ({str(item.get("itemIdentifier")) for item in reported or []}
                      if self.report_batch_item_failures else set())
            finished = [m for m in messages if m["MessageId"] not in failed]
            if finished:
                self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(finished)])
        # failed messages stay: visible again when their visibility timeout runs out
        for message in messages:
            body: Any
            try:
                body = json.loads(message["Body"])
            except ValueError:
                body = message["Body"]
            count = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            delivery = Delivery(message["MessageId"], count, body, event=event, result=result,
                                outcome="error" if message["MessageId"] in failed else "ok")
            self._record(delivery)
