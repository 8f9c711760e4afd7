"""A virtual BMS: a simple physical pack model sending the CAN frames of any profile.

The profile says where each model value lives in the DBC; the simulator runs that
mapping backwards. For every DBC message the profile reads it builds a plan: the
frame variants it needs (one per mux value, per cell-index value, or one), and the
writers that put simulated values into those frames, each inverting the profile's
conversion (`normalize.expr.linear`: scale, offset, unit, invert) back to the DBC's
physical value before cantools encodes it. Signals the profile does not read are 0
(or their minimum when 0 is out of range).

The model: N cells with an OCV curve (LFP or NMC), IR drop and a per-cell offset that
drifts (seeded RNG, so a seed gives the same frames every time); SoC integrates the
current; temperatures follow |current| with a lag; balancing flags come on for cells
more than 10 mV over the mean while charging. A scenario (docs/simulate.md) injects
timed events: set the current or SoC, drift a cell, open a temperature sensor, stop
sending (the BMS goes silent), or set one of the profile's BMS fault flags.

Everything runs in simulated time: `Simulator.frames()` is a pure function of the
config, scenario, seed and start time; `run_on_bus()` only paces it to the wall clock.

The package by job: `physics` (the pack model), `planning` (the frames a profile needs
and the writers that fill them), `runner` (the `Simulator` and its output), `demo`
(simulators and the gateway in one process). The scenario file is read, with the rest
of the configuration, by gateway/config/scenario.py.
"""

from gateway.commands.simulate.demo import demo_config, run_demo
from gateway.commands.simulate.physics import PackModel, Snapshot, ocv
from gateway.commands.simulate.runner import (
    FIXED_START,
    SimFrame,
    Simulator,
    find_pack,
    log_channel,
    write_candump,
)

__all__ = ["FIXED_START", "PackModel", "SimFrame", "Simulator", "Snapshot",
           "demo_config", "find_pack", "log_channel", "ocv",
           "run_demo", "write_candump"]
