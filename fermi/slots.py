"""A fair, bounded wait for a free engine slot: first come, first served, and a request that
would make the queue longer than its bound is refused up front instead of waiting forever."""

from __future__ import annotations

import threading
from collections import deque

from fermi.errors import QueueFull


class Ticket:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.done = False


class Slots:
    def __init__(self, capacity: int, max_waiting: int):
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.running = 0
        self._waiting: deque[Ticket] = deque()
        self._lock = threading.Lock()

    def reserve(self) -> Ticket:
        """Take a place in line (or a slot at once). Raises QueueFull past the bound."""
        ticket = Ticket()
        with self._lock:
            if self.running < self.capacity and not self._waiting:
                self.running += 1
                ticket.ready.set()
            elif len(self._waiting) >= self.max_waiting:
                raise QueueFull(
                    f"the server is at capacity ({self.running} running, "
                    f"{len(self._waiting)} waiting); retry shortly"
                )
            else:
                self._waiting.append(ticket)
        return ticket

    def wait(self, ticket: Ticket, cancelled: threading.Event) -> bool:
        """Block until the ticket holds a slot; False if cancelled while waiting."""
        while not ticket.ready.wait(0.05):
            if cancelled.is_set():
                with self._lock:
                    if not ticket.ready.is_set():
                        self._waiting.remove(ticket)
                        ticket.done = True
                        return False
        return True

    def release(self, ticket: Ticket) -> None:
        """Give back a slot (or a place in line); idempotent."""
        with self._lock:
            if ticket.done:
                return
            ticket.done = True
            if not ticket.ready.is_set():
                self._waiting.remove(ticket)
                return
            if self._waiting:
                self._waiting.popleft().ready.set()  # the slot passes straight on
            else:
                self.running -= 1

    @property
    def waiting(self) -> int:
        return len(self._waiting)
