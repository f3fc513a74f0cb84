"""Peak memory while quantizing: anonymous RSS (the process's own heap and tensors; file-backed pages such as a
memory-mapped checkpoint are excluded, the OS can drop them) sampled from /proc, and the accelerator's peak."""
from __future__ import annotations

import threading
import time

import torch


def anon_rss_mb() -> float | None:
    """Current anonymous resident memory (RssAnon of /proc/self/status) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Context manager sampling anonymous RSS every `interval` seconds in a background thread: `.peak_anon_mb`,
    `.start_anon_mb`, and `.peak_gpu_mb` (torch.cuda.max_memory_allocated, when CUDA is in use)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start_anon_mb = self.peak_anon_mb = None
        self.peak_gpu_mb = None
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            v = anon_rss_mb()
            if v is not None:
                self.peak_anon_mb = max(self.peak_anon_mb or 0.0, v)
            time.sleep(self.interval)

    def __enter__(self):
        self.start_anon_mb = self.peak_anon_mb = anon_rss_mb()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        v = anon_rss_mb()
        if v is not None:
            self.peak_anon_mb = max(self.peak_anon_mb or 0.0, v)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
        return False

    def report(self) -> dict:
        return {"peak_anon_rss_mb": self.peak_anon_mb, "anon_rss_at_start_mb": self.start_anon_mb,
                "peak_gpu_mb": self.peak_gpu_mb}
