"""Stage 5, publish: pack state and fault events to stdout or MQTT, durably through the outbox."""
