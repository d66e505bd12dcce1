"""Network segmentation: `none`, `segment: NAME`, `host` (docs/network.md).

The runtime uses NetworkManager (one per launcher); the policy engine uses
parse_network_config and resolve_network_plan. Everything else here is internal.

NetworkManager is imported lazily: it pulls in pyroute2, whose import costs ~0.3 s, which
the policy engine and `none` runs should never pay.
"""

from typing import TYPE_CHECKING, Any

from .config import (EgressRule, NetworkConfig, SegmentConfig, check_plan, parse_network_config,
                     resolve_network_plan, validate_network_config)

if TYPE_CHECKING:
    from .manager import NetworkManager

__all__ = ["EgressRule", "NetworkConfig", "NetworkManager", "SegmentConfig", "check_plan",
           "parse_network_config", "resolve_network_plan", "validate_network_config"]


def __getattr__(name: str) -> Any:
    if name == "NetworkManager":
        from .manager import NetworkManager
        return NetworkManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
