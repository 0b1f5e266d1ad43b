"""Engine slots: first come first served, bounded waiting, cancel while waiting."""

import threading

import pytest

from fermi.errors import QueueFull
from fermi.slots import Slots


def test_capacity_then_queue_then_full():
    slots = Slots(capacity=1, max_waiting=1)
    first = slots.reserve()
    assert first.ready.is_set()
    second = slots.reserve()
    assert not second.ready.is_set() and slots.waiting == 1
    with pytest.raises(QueueFull):
        slots.reserve()
    slots.release(first)
    assert second.ready.is_set() and slots.running == 1 and slots.waiting == 0
    slots.release(second)
    slots.release(second)  # idempotent
    assert slots.running == 0


def test_fifo_order():
    slots = Slots(capacity=1, max_waiting=10)
    holder = slots.reserve()
    waiting = [slots.reserve() for _ in range(3)]
    order = []
    for ticket in waiting:
        slots.release(holder)
        assert ticket.ready.is_set()
        order.append(ticket)
        holder = ticket
    assert order == waiting


def test_cancel_while_waiting_leaves_the_line():
    slots = Slots(capacity=1, max_waiting=10)
    holder = slots.reserve()
    ticket = slots.reserve()
    cancelled = threading.Event()
    cancelled.set()
    assert slots.wait(ticket, cancelled) is False
    assert slots.waiting == 0
    slots.release(ticket)  # no effect after leaving
    slots.release(holder)
    assert slots.running == 0
