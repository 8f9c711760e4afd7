"""bms-gateway: BMS CAN frames in, a normalized pack picture and durable fault events on MQTT out.

Pipeline: source -> decode -> normalize -> faults -> publish, wired by `daemon`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
