"""`faceflow monitor URL`: load a faceflow server with real photos and watch it.

N requests from C connections at once (each POSTs photos in turn to a route, /v1/anonymize by
default) while a sampler reads the server process's CPU and memory every `interval` seconds:
from the server's own /metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
so it works against any faceflow server, local or not), or with psutil for a local --pid.
Writes OUT/monitor.csv (a row per request: timestamp, request id, latency ms, CPU %, memory MB,
HTTP status), OUT/monitor.png (latency and CPU over the requests) and prints the summary: mean,
std, p50, p95 and max/min of the latency.
"""
from __future__ import annotations

import csv
import http.client
import itertools
import os
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from faceflow import media
from faceflow.images import BadInput


@dataclass
class Sample:
    at: float          # time.time()
    cpu_percent: float  # of one core
    memory_mb: float


@dataclass
class Answer:
    request_id: int
    at: float          # time.time() when the answer had arrived
    latency_ms: float
    status: int


def default_images() -> Path | None:
    """The test photos beside the checkout ($FACEFLOW_TEST_DATA or ../shared/data), if there."""
    root = Path(os.environ.get("FACEFLOW_TEST_DATA", Path("..") / "shared" / "data"))
    return root / "images" if (root / "images").is_dir() else None


def photos_in(folder: Path) -> list[tuple[str, bytes]]:
    """(media type, bytes) of every photo in `folder`, by name."""
    found = [(media.media_type_for(p.name), p.read_bytes()) for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix.lower() in media.IMAGE_EXTENSIONS]
    if not found:
        raise BadInput(f"no photos in {folder}")
    return found


def scrape(url: str, timeout: float = 5.0) -> tuple[float, float]:
    """(CPU seconds, resident bytes) of the server process, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode("utf-8")
    values = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("process_cpu_seconds", "process_resident_memory_bytes"):
            values[family.name] = family.samples[0].value
    if len(values) < 2:
        raise RuntimeError(f"{url} has no process_cpu_seconds_total and process_resident_memory_bytes")
    return values["process_cpu_seconds"], values["process_resident_memory_bytes"]


class Sampler(threading.Thread):
    """CPU % and memory of the server process every `interval` seconds until stopped."""

    def __init__(self, metrics_url: str, pid: int | None, interval: float):
        super().__init__(name="faceflow-monitor-sampler", daemon=True)
        self.metrics_url, self.pid, self.interval = metrics_url, pid, interval
        self.samples: list[Sample] = []
        self.errors = 0
        self._halt = threading.Event()

    def read(self):
        """(CPU seconds, resident bytes) now."""
        if self.pid is not None:
            times = self._process.cpu_times()
            return times.user + times.system, self._process.memory_info().rss
        return scrape(self.metrics_url)

    def run(self) -> None:
        if self.pid is not None:
            import psutil
            self._process = psutil.Process(self.pid)
        last_at, (last_cpu, _) = time.time(), self.read()
        while not self._halt.wait(self.interval):
            try:
                cpu, rss = self.read()
            except Exception:  # a busy server may miss a scrape; the next one counts
                self.errors += 1
                continue
            now = time.time()
            self.samples.append(Sample(now, 100.0 * (cpu - last_cpu) / max(1e-6, now - last_at), rss / 2**20))
            last_at, last_cpu = now, cpu

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def at(self, moment: float) -> Sample | None:
        """The first sample taken at or after `moment` (the one covering it), else the last."""
        for sample in self.samples:
            if sample.at >= moment:
                return sample
        return self.samples[-1] if self.samples else None


def load(url: str, route: str, photos: list[tuple[str, bytes]], requests: int, concurrency: int,
         warmup: bool, timeout: float) -> list[Answer]:
    """`requests` POSTs from `concurrency` keep-alive connections, photos in turn."""
    parts = urlsplit(url)
    path = (parts.path.rstrip("/") + route) if route.startswith("/") else route
    ids = itertools.count()
    answers: list[Answer] = []
    lock = threading.Lock()
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection

    def post(connection, n: int) -> tuple[int, float]:
        media_type, body = photos[n % len(photos)]
        start = time.perf_counter()
        connection.request("POST", path, body=body, headers={"Content-Type": media_type})
        response = connection.getresponse()
        response.read()
        return response.status, (time.perf_counter() - start) * 1000

    def worker(index: int) -> None:
        connection = connection_class(parts.hostname, parts.port, timeout=timeout)
        try:
            if warmup:
                post(connection, index)
            while (n := next(ids)) < requests:
                try:
                    status, ms = post(connection, n)
                except (OSError, http.client.HTTPException):
                    connection.close()
                    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
                    status, ms = 0, float("nan")
                with lock:
                    answers.append(Answer(n, time.time(), ms, status))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(answers, key=lambda a: a.at)


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)

    def percentile(q: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]
    return {"mean": statistics.fmean(ordered), "std": statistics.pstdev(ordered), "p50": percentile(0.50),
            "p95": percentile(0.95), "min": ordered[0], "max": ordered[-1], "max_min_ratio": ordered[-1] / ordered[0]}


def write_csv(path: Path, answers: list[Answer], sampler: Sampler) -> None:
    with open(path, "w", newline="") as out:
        table = csv.writer(out)
        table.writerow(["timestamp", "request_id", "latency_ms", "cpu_percent", "memory_mb", "status"])
        for answer in answers:
            sample = sampler.at(answer.at)
            table.writerow([f"{answer.at:.3f}", answer.request_id, f"{answer.latency_ms:.1f}",
                            "" if sample is None else f"{sample.cpu_percent:.1f}",
                            "" if sample is None else f"{sample.memory_mb:.1f}", answer.status])


def plot(path: Path, answers: list[Answer], sampler: Sampler, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = range(1, len(answers) + 1)
    samples = [sampler.at(a.at) for a in answers]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    top.plot(order, [a.latency_ms for a in answers], ".-", linewidth=0.8, markersize=3, color="tab:blue")
    top.set_ylabel("latency (ms)")
    top.set_title(title, fontsize=10)
    top.grid(alpha=0.3)
    bottom.plot(order, [s.cpu_percent if s else float("nan") for s in samples], "-", color="tab:red")
    bottom.set_ylabel("server CPU (% of one core)", color="tab:red")
    bottom.set_xlabel("request (in order of answer)")
    bottom.grid(alpha=0.3)
    memory = bottom.twinx()
    memory.plot(order, [s.memory_mb if s else float("nan") for s in samples], "--", color="tab:gray")
    memory.set_ylabel("server memory (MB)", color="tab:gray")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(args) -> int:
    folder = Path(args.images) if args.images else default_images()
    if folder is None:
        raise BadInput("no photos: give --images DIR (../shared/data/images is not here)")
    if args.requests < 1 or args.concurrency < 1:
        raise BadInput("--requests and --concurrency must be at least 1")
    photos = photos_in(folder)
    url = args.url.rstrip("/")
    sampler = Sampler(f"{url}/metrics", args.pid, args.interval)
    if args.pid is not None:
        import psutil
        if not psutil.pid_exists(args.pid):
            raise BadInput(f"no process {args.pid} here")
    else:
        try:
            scrape(sampler.metrics_url)
        except Exception as exc:
            raise BadInput(f"cannot read {url}/metrics ({exc}); give --pid to sample a local process") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sampler.start()
    started = time.perf_counter()
    try:
        answers = load(url, args.route, photos, args.requests, args.concurrency, args.warmup, args.timeout)
    finally:
        time.sleep(min(args.interval, 1.0))  # a sample after the last answer
        sampler.stop()
    seconds = time.perf_counter() - started
    write_csv(out / "monitor.csv", answers, sampler)
    ok = [a.latency_ms for a in answers if 200 <= a.status < 300]
    failed = len(answers) - len(ok)
    title = (f"{args.requests} requests to {args.route}, concurrency {args.concurrency}, "
             f"{len(photos)} photos; load average {os.getloadavg()[0]:.2f}")
    plot(out / "monitor.png", answers, sampler, title)
    cpu = [s.cpu_percent for s in sampler.samples]
    memory = [s.memory_mb for s in sampler.samples]
    print(f"{len(answers)} requests in {seconds:.1f} s ({len(answers) / seconds:.1f}/s), {failed} failed; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if ok:
        s = summary(ok)
        print(f"latency ms: mean {s['mean']:.1f}  std {s['std']:.1f}  p50 {s['p50']:.1f}  p95 {s['p95']:.1f}  "
              f"min {s['min']:.1f}  max {s['max']:.1f}  max/min {s['max_min_ratio']:.1f}")
    if cpu:
        print(f"server CPU %: mean {statistics.fmean(cpu):.0f}  max {max(cpu):.0f}; "
              f"memory MB: mean {statistics.fmean(memory):.0f}  max {max(memory):.0f} "
              f"({len(cpu)} samples every {args.interval:g} s)")
    print(f"wrote {out / 'monitor.csv'} and {out / 'monitor.png'}", file=sys.stderr)
    return 1 if failed else 0
