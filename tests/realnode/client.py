"""A client of a KubeTune inference Service, as the real-node tier and bench/rollout.py use it:
one chat completion, and a steady load of them from threads (the server batches concurrent
requests), whole or streamed. Only the standard library."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

# The built-in dataset's system message: the fine-tune answers it with one kubectl command.
SYSTEM = "Answer with one kubectl command."
PROMPT = "List all pods in the namespace staging."


def messages(content: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def _open(url: str, body: dict[str, Any], timeout: float) -> Any:
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    # No proxy: the Service's ClusterIP is reached from the host directly.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(request, timeout=timeout)


def post_chat(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    with _open(url, body, timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def stream_chat(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """A streamed chat completion read to its end (`data: [DONE]`), as one answer: the model
    of its chunks and their text joined. A chunk carrying an error, or a stream that ends
    without [DONE], raises ValueError."""
    models, parts = set(), []
    with _open(url, {**body, "stream": True}, timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                [model] = models
                text = "".join(parts)
                return {"model": model, "choices": [{"message": {"content": text}}]}
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise ValueError(f"error in the stream: {chunk['error']}")
            models.add(chunk["model"])
            parts += [choice["delta"].get("content") or "" for choice in chunk["choices"]]
    raise ValueError("the stream ended without data: [DONE]")


def chat(
    url: str, model: str, content: str, max_tokens: int = 48, *,
    conversation: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """One greedy answer to `content` under the built-in dataset's system message, or to
    the whole `conversation` when given."""
    body = {"model": model, "messages": conversation or messages(content),
            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    return post_chat(url, body, timeout=60)


@dataclass
class Load:
    """Chat completions sent to the Service without pause from `threads` threads; every
    answer's `model` is kept and every failure recorded with the time it happened."""

    url: str
    model: str
    threads: int = 8
    conversation: list[dict[str, str]] = field(default_factory=lambda: messages(PROMPT))
    max_tokens: int = 1
    stream: bool = False
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    models: set[str] = field(default_factory=set)
    seconds: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def one(self) -> None:
        body = {"model": self.model, "messages": self.conversation,
                "max_tokens": self.max_tokens}  # fmt: skip
        try:
            send = stream_chat if self.stream else post_chat
            answer = send(self.url, body, timeout=30)
            with self._lock:
                self.ok += 1
                self.models.add(answer["model"])
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            with self._lock:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {exc!r}")

    def run(self) -> None:
        while not self._stop.is_set():
            self.one()

    def wait_for_requests(self, ok: int, timeout: float = 120) -> None:
        """Until `ok` requests have been answered (so a phase is known to have had traffic)."""
        deadline = time.monotonic() + timeout
        while self.ok < ok and not self.failures:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.ok} of {ok} requests answered in {timeout:.0f} s")
            time.sleep(0.1)

    @property
    def rate(self) -> float:
        """Requests sent per second (answered or failed) while the load ran."""
        return (self.ok + len(self.failures)) / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.ok} ok, {len(self.failures)} failed in {self.seconds:.0f} s, "
                f"{self.rate:.1f} requests/s")  # fmt: skip

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self.run, daemon=True)
                         for _ in range(self.threads)]  # fmt: skip
        self._started = time.monotonic()
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)
        self.seconds = time.monotonic() - self._started
