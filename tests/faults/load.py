"""A steady load of jobs and API calls against a stack, as its clients would make them, and the
reckoning afterwards: did every submitted job reach a final state, once, with its images once?

Clients submit txt2img jobs in one call each (`payload_string`) with an `Idempotency-Key`, and
retry a 503, a refused connection or a timeout with the same key, as a careful ESD client
does: a submission the gateway may have taken before it died is never a second job. Other
clients read the API meanwhile. Every answer is kept: its status, its time, its message when it
is an error. Used by the fault suite (tests/faults) and bench/load.py."""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import httpx

FINAL = ("succeed", "failed", "canceled")
PAYLOAD = {"prompt": "a lighthouse", "steps": 2, "sampler_name": "Euler", "width": 64, "height": 64, "seed": 1}


@dataclass
class Call:
    method: str
    path: str
    status: int  # 0: no answer (refused, reset); -1: no answer within the client's timeout
    seconds: float
    message: str = ""


@dataclass
class Figures:
    """What a run of load came to."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    given_up: list[str] = field(default_factory=list)  # submissions never answered with an id: the last answer
    unavailable: int = 0  # 503 answers while something was down
    refused: int = 0  # calls with no answer at all (the gateway down: refused, reset)
    server_errors: list[Call] = field(default_factory=list)  # 5xx other than 503
    hung: list[Call] = field(default_factory=list)  # calls with no answer within their timeout
    unnamed_503: list[Call] = field(default_factory=list)  # a 503 that does not say what is down
    latencies: list[float] = field(default_factory=list)  # submit to done, seconds
    span: float = 0.0  # seconds from the first job's creation to the last one's end

    def line(self) -> str:
        return (
            f"submitted {self.submitted} / completed {self.completed} / failed {self.failed} / "
            f"lost {self.lost} / duplicated {self.duplicated}; {self.unavailable} answers 503, "
            f"{self.refused} refused, "
            f"{len(self.server_errors)} other 5xx, {len(self.hung)} hung, {len(self.given_up)} submissions given up"
        )


class Load:
    """`clients` threads submitting jobs (each waiting `pause` seconds between two) and
    `readers` threads reading the API, until `stop()`."""

    def __init__(
        self,
        url: str,
        api_key: str,
        user: str,
        endpoint: str,
        model: str,
        *,
        clients: int = 2,
        readers: int = 1,
        pause: float = 0.5,
        timeout: float = 30.0,
        retry_for: float = 120.0,
        total: int | None = None,
    ) -> None:
        self.url, self.endpoint, self.model = url, endpoint, model
        self.headers = {"x-api-key": api_key, "username": user}
        self.clients, self.readers, self.pause = clients, readers, pause
        self.timeout, self.retry_for = timeout, retry_for
        self.budget = total  # jobs all clients together submit (None: until stopped)
        self.jobs: dict[str, float] = {}  # id -> when it was submitted (monotonic)
        self.calls: list[Call] = []
        self.given_up: list[str] = []  # per submission given up: the last answer it had
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._submit_forever, daemon=True) for _ in range(self.clients)]
        self.threads += [threading.Thread(target=self._read_forever, daemon=True) for _ in range(self.readers)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    def wait_submitted(self) -> None:
        """Until the clients have submitted `total` jobs (bench)."""
        for thread in self.threads[: self.clients]:
            thread.join()

    def _call(self, http: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response | None:
        began = time.monotonic()
        try:
            response = http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            self._record(Call(method, path, -1, time.monotonic() - began))
            return None
        except httpx.TransportError as error:
            self._record(Call(method, path, 0, time.monotonic() - began, str(error)))
            return None
        message = ""
        if response.status_code >= 400:
            try:
                message = response.json().get("message", "")
            except ValueError:
                message = response.text[:200]
        self._record(Call(method, path, response.status_code, time.monotonic() - began, message))
        return response

    def _record(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)

    def submit(self, http: httpx.Client) -> str | None:
        """One job, retried with its key until it has an id (or `retry_for` has passed)."""
        key = uuid.uuid4().hex
        body = {
            "task_type": "txt2img",
            "inference_type": "Async",
            "sagemaker_endpoint_name": self.endpoint,
            "models": {"Stable-diffusion": [self.model]},
            "payload_string": json.dumps({**PAYLOAD, "seed": int(key[:6], 16)}),
        }
        submitted = time.monotonic()
        deadline = submitted + self.retry_for
        last = "no answer"
        while time.monotonic() < deadline:
            response = self._call(http, "POST", "/inferences", json=body, headers={"Idempotency-Key": key})
            if response is not None:
                last = f"{response.status_code} {response.text[:200]}"
            if response is not None and response.status_code in (200, 201, 202):
                data = response.json()["data"]
                inference = data.get("inference", data)
                job_id = inference.get("id") or inference.get("inference_id")
                with self.lock:
                    self.jobs.setdefault(job_id, submitted)
                return job_id
            if response is not None and response.status_code not in (409, 503):
                raise AssertionError(f"a job was refused: {response.status_code} {response.text}")
            time.sleep(0.5)
        with self.lock:
            self.given_up.append(last)
        return None

    def _submit_forever(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout) as http:
            while not self.stopping.is_set():
                if self.budget is not None:
                    with self.lock:
                        if self.budget == 0:
                            return
                        self.budget -= 1
                self.submit(http)
                self.stopping.wait(self.pause)

    def _read_forever(self) -> None:
        paths = ["/users", "/checkpoints", "/inferences", "/endpoints", "/trainings", "/roles"]
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout) as http:
            turn = 0
            while not self.stopping.is_set():
                self._call(http, "GET", paths[turn % len(paths)])
                turn += 1
                self.stopping.wait(0.2)

    # --- the reckoning ---

    def settle(self, storage, bucket: str, timeout: float = 300.0) -> Figures:
        """Waits until every submitted job is final (or `timeout`), then counts."""
        figures = Figures(submitted=len(self.jobs), given_up=list(self.given_up))
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout) as http:
            pending = dict(self.jobs)
            finals: dict[str, dict] = {}
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                for job_id in list(pending):
                    try:
                        response = http.get(f"/inferences/{job_id}")
                    except httpx.TransportError:
                        break
                    if response.status_code == 200 and response.json()["data"]["status"] in FINAL:
                        finals[job_id] = response.json()["data"]
                        figures.latencies.append(_done_after(finals[job_id]))
                        pending.pop(job_id)
                if pending:
                    time.sleep(1)
        figures.latencies = [seconds for seconds in figures.latencies if seconds is not None]
        times = [(_time(job, "createTime"), _time(job, "completeTime")) for job in finals.values()]
        if times and all(created and completed for created, completed in times):
            figures.span = max(completed for _, completed in times) - min(created for created, _ in times)
        figures.lost = len(pending)
        for job_id, job in finals.items():
            if job["status"] == "succeed":
                figures.completed += 1
            else:
                figures.failed += 1
            stored = [
                item["Key"]
                for item in storage.list_objects_v2(Bucket=bucket, Prefix=f"out/{job_id}/result/").get("Contents", [])
                if item["Key"].endswith(".png")
            ]
            names = job.get("image_names") or []
            if len(stored) > 1 or len(names) != len(set(names)) or len(names) > 1:
                figures.duplicated += 1
        for call in self.calls:
            if call.status == 503:
                figures.unavailable += 1
                if "unavailable" not in call.message and "did not answer" not in call.message:
                    figures.unnamed_503.append(call)
            elif call.status >= 500:
                figures.server_errors.append(call)
            elif call.status == -1:
                figures.hung.append(call)
            elif call.status == 0:
                figures.refused += 1
        return figures


def _time(job: dict, name: str) -> float | None:
    """A time of the job's record (ESD's `2024-02-05 06:10:52.552528`, UTC) as a timestamp."""
    try:
        return datetime.fromisoformat(job[name]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def _done_after(job: dict) -> float | None:
    """Seconds from the job's creation (its submission) to its end, as its record says."""
    created, completed = _time(job, "createTime"), _time(job, "completeTime")
    return None if created is None or completed is None else completed - created


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
