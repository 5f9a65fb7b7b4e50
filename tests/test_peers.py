"""peers.watch against a stand-in for jax's key-value store: a peer whose beat stops is reported once,
a peer that said it is done is not, and an unreachable store means process 0 is gone."""

import threading
import time

import pytest

from ijepa_jax import peers


class Store:
    """The key-value calls peers uses, in memory; `reachable=False` makes every call fail."""

    def __init__(self):
        self.values, self.reachable, self.lock = {}, True, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        if not self.reachable:
            raise RuntimeError("UNAVAILABLE: failed to connect")
        with self.lock:
            self.values[key] = value

    def key_value_try_get(self, key):
        if not self.reachable:
            raise RuntimeError("UNAVAILABLE: failed to connect")
        with self.lock:
            if key not in self.values:
                raise RuntimeError(f"NOT_FOUND: {key}")
            return self.values[key]


@pytest.fixture
def two_processes(monkeypatch):
    """This test is process 0 of 2; `exits` collects what would have ended the process."""
    store, exits = Store(), []
    monkeypatch.setattr(peers.jax, "process_count", lambda: 2)
    monkeypatch.setattr(peers.jax, "process_index", lambda: 0)
    monkeypatch.setattr(peers.distributed.global_state, "client", store)
    monkeypatch.setattr(peers, "_exit", exits.append)
    return store, exits


def beat(store, key, stop, every_s=0.01):
    n = 0
    while not stop.wait(every_s):
        n += 1
        store.key_value_set(key, str(n))


def test_a_peer_that_stops_beating_is_reported_after_the_silence_and_not_before(two_processes):
    store, exits = two_processes
    stop = threading.Event()
    peer = threading.Thread(target=beat, args=(store, "ijepa_jax/alive/1", stop))
    peer.start()
    with peers.watch(lambda p, s: f"process {p} silent {s} s", beat_s=0.01, silent_s=1.0):
        time.sleep(2.0)
        assert exits == []  # beating: never reported, though longer than silent_s has passed
        stop.set()
        peer.join()
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
    assert exits and exits[0] == "process 1 silent 1.0 s"
    assert store.values["ijepa_jax/alive/0"] == "done"


def test_a_peer_that_said_done_is_not_waited_for(two_processes):
    store, exits = two_processes
    store.key_value_set("ijepa_jax/alive/1", "done")
    with peers.watch(lambda p, s: f"process {p}", beat_s=0.01, silent_s=0.1):
        time.sleep(0.4)
    assert exits == []


def test_an_unreachable_store_means_process_0_is_gone(two_processes, monkeypatch):
    store, exits = two_processes
    monkeypatch.setattr(peers.jax, "process_index", lambda: 1)
    with peers.watch(lambda p, s: f"process {p}", beat_s=0.01, silent_s=10.0):
        time.sleep(0.05)
        store.reachable = False
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.01)
    assert exits[:1] == ["process 0"]


def test_one_process_watches_nothing(monkeypatch):
    monkeypatch.setattr(peers, "_exit", lambda line: pytest.fail(line))
    with peers.watch(lambda p, s: "x", beat_s=0.001, silent_s=0.001):
        time.sleep(0.05)
