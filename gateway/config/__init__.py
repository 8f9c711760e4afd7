"""The one module that reads YAML: gateway config and BMS profiles, parsed and checked.

Every problem is collected (not just the first) as a `Problem` naming the file, the key
path, what is wrong and how to fix it, so `check-config` can print them all at once.
Checking a profile against its DBC happens in `normalize.compiler.compile_pack`, which
reports through the same `Problem` type.

The parts: `yamlsafe` (the bounded YAML reader), `problems` (Problem, ConfigError and
the collecting Reader), `limits` (values the daemon cannot run with), `paths` (built-in
files), `types` (the frozen parsed config), `profile`, `polling`, `rules` and `load`
(the parsers), `scenario` (the simulator's scenario files).
"""

from __future__ import annotations

from gateway.config.limits import (
    DBC_MAX_BYTES,
    HOST_MAX,
    ID_FIX,
    LABEL_MAX,
    MAX_CELLS,
    TOPIC_SEGMENT_MAX,
    YAML_MAX_BYTES,
    can_interface_problem,
    file_problem,
    host_problem,
    id_problem,
    state_dir_problem,
    topic_segment_problem,
)
from gateway.config.load import (
    load_config,
)
from gateway.config.paths import (
    BUILTIN_CONFIG,
    BUILTIN_DBC,
    BUILTIN_PROFILES,
    PROJECT_ROOT,
    available_profiles,
    default_state_dir,
    find_profile,
    resolve_file,
)
from gateway.config.problems import (
    ConfigError,
    Problem,
    Reader,
    nearest,
)
from gateway.config.profile import (
    CHEMISTRIES,
    MAX_EXPR_CHARS,
    load_profile,
    parse_chemistry,
)
from gateway.config.scenario import Scenario, load_scenario, parse_scenario
from gateway.config.types import (
    CHECKSUM_METHODS,
    UNIT_FACTORS,
    BmsFault,
    CanBus,
    CellBlock,
    CellKind,
    CellSource,
    DtcStream,
    FrameCheck,
    Gate,
    GatewayConfig,
    HomeAssistantConfig,
    IsoTpRequest,
    MqttConfig,
    OutboxConfig,
    PackConfig,
    PollRequest,
    Profile,
    PublishPolicy,
    TlsConfig,
    TopicPolicy,
    ValueSpec,
)
from gateway.config.yamlsafe import (
    MAX_YAML_NODES,
    expanded_size,
    read_yaml,
)

__all__ = [
    "BUILTIN_CONFIG",
    "BUILTIN_DBC",
    "BUILTIN_PROFILES",
    "CHECKSUM_METHODS",
    "CHEMISTRIES",
    "DBC_MAX_BYTES",
    "HOST_MAX",
    "ID_FIX",
    "LABEL_MAX",
    "MAX_CELLS",
    "MAX_EXPR_CHARS",
    "MAX_YAML_NODES",
    "PROJECT_ROOT",
    "TOPIC_SEGMENT_MAX",
    "UNIT_FACTORS",
    "YAML_MAX_BYTES",
    "BmsFault",
    "CanBus",
    "CellBlock",
    "CellKind",
    "CellSource",
    "ConfigError",
    "DtcStream",
    "FrameCheck",
    "Gate",
    "GatewayConfig",
    "HomeAssistantConfig",
    "IsoTpRequest",
    "MqttConfig",
    "OutboxConfig",
    "PackConfig",
    "PollRequest",
    "Problem",
    "Profile",
    "PublishPolicy",
    "Reader",
    "Scenario",
    "TlsConfig",
    "TopicPolicy",
    "ValueSpec",
    "available_profiles",
    "can_interface_problem",
    "default_state_dir",
    "expanded_size",
    "file_problem",
    "find_profile",
    "host_problem",
    "id_problem",
    "load_config",
    "load_profile",
    "load_scenario",
    "nearest",
    "parse_chemistry",
    "parse_scenario",
    "read_yaml",
    "resolve_file",
    "state_dir_problem",
    "topic_segment_problem",
]
