"""Stage 1, source: frames from a recorded log or a live bus, as ``(ts, key, data)`` batches."""
