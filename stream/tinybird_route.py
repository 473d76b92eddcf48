"""Routing to Tinybird: the router's config with the Tinybird target attached.

``Router(TinybirdRouterConfig(..., sink="tinybird", tinybird=TinybirdConfig(...))).run()`` routes through
the seam of stream/sinks.py: ``make_sink`` -> ``connectors.tinybird.make_router_sink(config, dlq)``, which
reads ``config.tinybird``. Everything else (decoding, retirements, the DLQ, batching, rebalances) is the
router's own. Offsets are committed by the sink only after Tinybird acknowledged every row before them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from connectors.tinybird import TinybirdConfig
from connectors.tinybird_api import Secret
from stream.router import RouterConfig


@dataclass(frozen=True)
class TinybirdRouterConfig(RouterConfig):
    tinybird: TinybirdConfig | None = None

    def __post_init__(self) -> None:
        if self.sink == "tinybird" and self.tinybird is None:
            raise ValueError("sink tinybird needs a TinybirdConfig (--tinybird-url, BUCKETER_TINYBIRD_TOKEN)")
        if self.tinybird is not None and self.tinybird.buckets != self.buckets:
            raise ValueError(f"tinybird buckets {self.tinybird.buckets} != router buckets {self.buckets}")


def with_tinybird(config: RouterConfig, url: str, token: Secret, **tinybird: object) -> TinybirdRouterConfig:
    """``config`` (the route command's) with the Tinybird target attached and ``sink="tinybird"``."""
    base = {f.name: getattr(config, f.name) for f in fields(RouterConfig)} | {"sink": "tinybird"}
    tb = TinybirdConfig(url=url, token=token, buckets=config.buckets, **tinybird)  # type: ignore[arg-type]
    return TinybirdRouterConfig(**base, tinybird=tb)
