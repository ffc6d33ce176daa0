"""Requests that arrive together become one generate call with an adapter per row (AdapterPool's mixed batch).

Written here because no library in the stack batches independent requests over per-row LoRA adapters on one
transformers model: vLLM and LoRAX do it with their own engines, transformers' `generate` takes a ready batch. A
worker thread takes what is queued (up to `max_batch` requests, waiting `window_s` for company), runs one `generate`,
and a stopping criterion watches every row as it grows: it hands each request its new text, ends a row at its own
EOS, stop string or `max_tokens`, and ends the call once every row is done."""
import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..adapters.pool import AdapterPool


@dataclass(frozen=True)
class Sampling:
    """Rows of one generate call share these; requests that differ go into separate calls."""
    temperature: float
    top_p: float

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass(frozen=True)
class Text:
    """New text of a request's answer."""
    text: str


@dataclass(frozen=True)
class Done:
    """The answer is complete: why it ended (stop, length) and the token counts."""
    reason: str
    usage: dict


@dataclass(frozen=True)
class Failed:
    """Generation failed for this request; the server serves on."""
    error: Exception


@dataclass
class Job:
    """One request: its prompt ids, adapter (None: the bare base) and limits; events go to `events` on `loop`."""
    ids: list[int]
    adapter: str | None
    max_tokens: int
    stop: list[str]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already handed out
    finish_reason: str | None = None

    def emit(self, event: Text | Done | Failed) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Rows(StoppingCriteria):
    """Called by `generate` after each new token with the whole batch: follows each row's text and decides per row
    when it is done. (A streamer cannot decide; a stopping criterion sees the same tokens and can.)"""

    def __init__(self, jobs: list[Job], tokenizer):
        self.jobs, self.tokenizer = jobs, tokenizer
        self.holdback = max((len(s) for job in jobs for s in job.stop), default=1) - 1

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()
        for job, token in zip(self.jobs, newest):
            if job.finish_reason is None:
                self._grow(job, token)
        return torch.tensor([job.finish_reason is not None for job in self.jobs], device=input_ids.device)

    def _grow(self, job: Job, token: int) -> None:
        if token == self.tokenizer.eos_token_id:
            return self.finish(job, "stop")
        job.tokens.append(token)
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self.finish(job, "stop", text[:cut])
        if len(job.tokens) >= job.max_tokens:
            return self.finish(job, "length", text)
        # hold back an incomplete UTF-8 character and what could still become a stop string
        ready = len(text) - (self.holdback if job.stop else 0)
        while ready > job.sent and text[ready - 1] == "\ufffd":
            ready -= 1
        if ready > job.sent:
            job.emit(Text(text[job.sent:ready]))
            job.sent = ready

    def finish(self, job: Job, reason: str, text: str | None = None) -> None:
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True) if text is None else text
        if len(text) > job.sent:
            job.emit(Text(text[job.sent:]))
        job.finish_reason = reason
        job.emit(Done(reason, {"prompt_tokens": len(job.ids), "completion_tokens": len(job.tokens),
                               "total_tokens": len(job.ids) + len(job.tokens)}))


class Batcher:
    def __init__(self, pool: AdapterPool, max_batch: int = 8, window_s: float = 0.005):
        self.pool, self.max_batch, self.window_s = pool, max_batch, window_s
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.waiting: list[Job] = []  # taken from the queue but not fitting the last batch
        self.calls = self.rows = 0  # generate calls made and requests they served (rows / calls: batching at work)
        self.thread = threading.Thread(target=self._serve, name="lora-tune-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    @property
    def queued(self) -> int:
        return self.queue.qsize() + len(self.waiting)

    def _serve(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            self._generate_or_fail(jobs)

    def _generate_or_fail(self, jobs: list[Job]) -> None:
        """A failed batch fails its requests, never the server. One bad row (an adapter whose logits turn NaN) must
        not fail the others: a failed batch of several is retried row by row, for the rows that have sent no text
        yet (what was streamed cannot be taken back)."""
        try:
            self._generate(jobs)
        except Exception as exc:
            fresh = [job for job in jobs if job.finish_reason is None and not job.sent]
            for job in jobs:
                if job.finish_reason is None and job not in fresh:
                    job.finish_reason = "error"
                    job.emit(Failed(exc))
            if len(jobs) == 1:
                for job in fresh:
                    job.finish_reason = "error"
                    job.emit(Failed(exc))
                return
            for job in fresh:
                job.tokens = []
                self._generate_or_fail([job])

    def _next_batch(self) -> list[Job] | None:
        """The oldest request and those that can share its call: same sampling, at most `max_batch` rows, no more
        distinct adapters than the pool keeps loaded. The rest wait for the next call, in order."""
        if not self.waiting:
            job = self.queue.get()
            if job is None:
                return None
            self.waiting.append(job)
        deadline = time.monotonic() + self.window_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                job = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # seen again once the waiting requests are served
                break
            self.waiting.append(job)
        first, batch, rest, adapters = self.waiting[0], [], [], set()
        for job in self.waiting:
            fits = (len(batch) < self.max_batch and job.sampling == first.sampling
                    and len(adapters | {job.adapter} - {None}) <= self.pool.max_loaded)
            (batch if fits else rest).append(job)
            if fits and job.adapter is not None:
                adapters.add(job.adapter)
        self.waiting = rest
        return batch

    def _generate(self, jobs: list[Job]) -> None:
        self.calls, self.rows = self.calls + 1, self.rows + len(jobs)
        rows = Rows(jobs, self.pool.tokenizer)
        self.pool.generate_from_ids([job.ids for job in jobs], [job.adapter for job in jobs],
                                    max_new_tokens=max(job.max_tokens for job in jobs),
                                    stopping_criteria=StoppingCriteriaList([rows]), **jobs[0].sampling.generate_kwargs())
        for job in jobs:  # rows the model stopped without a token of ours (max_new_tokens of the call)
            if job.finish_reason is None:
                rows.finish(job, "length")
