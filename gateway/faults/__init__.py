"""Stage 4, faults: BMS flags and gateway rules raised and cleared on frame time."""
