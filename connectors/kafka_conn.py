"""``KafkaConnection``: where Kafka is and how to get in — the one object every Kafka client is built from.

- Bootstrap servers, security protocol, SASL and TLS settings, and any other librdkafka key (``extra``: passed
  through as given). Secret values (``sasl.password``, ``ssl.key.password``, ``sasl.oauthbearer.client.secret``,
  any key naming a password or secret, ...) are held as ``Secret``: the repr, the str and every error message
  show ``***``; only ``client_config()`` reveals them, for librdkafka.
- ``KafkaConnection.from_settings({librdkafka key: value})`` builds one from librdkafka keys (a config file's
  ``[kafka]`` table, ``BUCKETER_KAFKA_*`` variables, flags: bucketer/options.py layers them);
  ``KafkaConnection.plain("host:port")`` is a PLAINTEXT one.
- Validated at construction, with a one-line ``ValueError`` naming the key: an unknown ``security.protocol``,
  SASL without ``sasl.mechanism`` or (for PLAIN and SCRAM) without ``sasl.username``/``sasl.password``, SASL or
  TLS settings with a protocol that does not use them, a certificate file that does not exist, a key bucketer
  sets itself (``group.id``, ``transactional.id``, ...).
- ``str(connection)`` is what error messages name: the bootstrap servers, plus the protocol when not PLAINTEXT.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.secret import Secret

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("GSSAPI", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
# Mechanisms that log in with a user name and password.
PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# librdkafka keys whose values are secrets (besides any key naming a password or secret).
SECRET_KEYS = frozenset(
    {
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "ssl.key.pem",
        "ssl_key",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "sasl.oauthbearer.assertion.private.key.pem",
    }
)
# Keys bucketer sets itself, per client: a connection must not change how offsets, transactions or groups work.
RESERVED_KEYS = frozenset(
    {
        "group.id",
        "transactional.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "isolation.level",
        "enable.idempotence",
        "logger",
        "on_delivery",
        "error_cb",
    }
)
# Files librdkafka reads; they must exist when given ("probe": librdkafka looks for the system's CA bundle).
FILE_KEYS = ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.keystore.location")
_KEY = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
Value = str | int | float | bool


def is_secret_key(key: str) -> bool:
    return key in SECRET_KEYS or "password" in key or "secret" in key


def _check_value(key: str, value: object) -> None:
    if isinstance(value, Secret):
        return
    if not isinstance(value, str | int | float | bool):
        raise ValueError(f"kafka setting {key}: expected a string, number or boolean, not {type(value).__name__}")


@dataclass(frozen=True)
class KafkaConnection:
    """Bootstrap servers, security protocol, SASL/TLS settings and extra librdkafka keys (see the module)."""

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_ca_location: str | None = None
    # Any other librdkafka key, sorted by key; secret ones hold a Secret.
    extra: tuple[tuple[str, Value | Secret], ...] = field(default=())

    def __post_init__(self) -> None:
        servers = self.bootstrap_servers.strip() if isinstance(self.bootstrap_servers, str) else ""
        if not servers:
            raise ValueError(
                "kafka setting bootstrap.servers is missing: give --bootstrap, BUCKETER_BOOTSTRAP or bootstrap.servers "
                "in the [kafka] table of --kafka-config"
            )
        object.__setattr__(self, "bootstrap_servers", servers)
        protocol = str(self.security_protocol).upper()
        if protocol not in PROTOCOLS:
            raise ValueError(
                f"kafka setting security.protocol: unknown protocol {self.security_protocol!r} "
                f"(expected one of {', '.join(PROTOCOLS)})"
            )
        object.__setattr__(self, "security_protocol", protocol)
        if self.sasl_password is not None and not isinstance(self.sasl_password, Secret):
            raise ValueError("kafka setting sasl.password must be a Secret (a plain string would print itself)")
        extra = tuple(sorted(self.extra))
        seen: set[str] = set()
        for key, value in extra:
            if key in seen:
                raise ValueError(f"kafka setting {key} is given twice")
            seen.add(key)
            if not _KEY.match(key):
                raise ValueError(f"kafka setting {key!r}: not a librdkafka key (lower case, dot separated)")
            if key in RESERVED_KEYS:
                raise ValueError(f"kafka setting {key} is set by bucketer itself; remove it from the Kafka settings")
            if key in _FIELD_KEYS:
                raise ValueError(f"kafka setting {key} belongs in its own field, not in extra")
            _check_value(key, value)
            if is_secret_key(key) and not isinstance(value, Secret):
                raise ValueError(f"kafka setting {key} must be a Secret (a plain string would print itself)")
        object.__setattr__(self, "extra", extra)
        sasl = protocol.startswith("SASL_")
        if sasl:
            mechanism = (self.sasl_mechanism or "").upper()
            if not mechanism:
                raise ValueError(
                    f"kafka setting sasl.mechanism is missing: security.protocol {protocol} needs one of "
                    f"{', '.join(MECHANISMS)}"
                )
            if mechanism not in MECHANISMS:
                raise ValueError(
                    f"kafka setting sasl.mechanism: unknown mechanism {self.sasl_mechanism!r} "
                    f"(expected one of {', '.join(MECHANISMS)})"
                )
            object.__setattr__(self, "sasl_mechanism", mechanism)
            if mechanism in PASSWORD_MECHANISMS:
                if not self.sasl_username:
                    raise ValueError(f"kafka setting sasl.username is missing: sasl.mechanism {mechanism} needs it")
                if not self.sasl_password:
                    raise ValueError(
                        f"kafka setting sasl.password is missing: sasl.mechanism {mechanism} needs it "
                        f"(BUCKETER_KAFKA_SASL_PASSWORD or the config file; never a flag)"
                    )
        else:
            stray = [k for k, v in self._sasl_items() if v is not None] + [k for k in seen if k.startswith("sasl.")]
            if stray:
                raise ValueError(
                    f"kafka setting {stray[0]} is set but security.protocol is {protocol}: SASL needs "
                    f"SASL_PLAINTEXT or SASL_SSL"
                )
        if not protocol.endswith("SSL"):
            stray = (["ssl.ca.location"] if self.ssl_ca_location else []) + [k for k in seen if k.startswith("ssl.")]
            if stray:
                raise ValueError(
                    f"kafka setting {stray[0]} is set but security.protocol is {protocol}: TLS needs SSL or SASL_SSL"
                )
        for key, value in self._items():
            if key in FILE_KEYS and value != "probe" and not Path(str(value)).expanduser().exists():
                raise ValueError(f"kafka setting {key}: no such file {value}")

    # --- building -------------------------------------------------------------------------------------
    @classmethod
    def plain(cls, bootstrap_servers: str) -> KafkaConnection:
        """A PLAINTEXT connection to ``bootstrap_servers`` ("host:port[,host:port...]")."""
        return cls(bootstrap_servers)

    @classmethod
    def from_settings(cls, settings: Mapping[str, object]) -> KafkaConnection:
        """From librdkafka keys and values (strings, numbers, booleans; secrets as str or Secret)."""
        fields: dict[str, Any] = {}
        extra: list[tuple[str, Value | Secret]] = []
        for key, value in settings.items():
            _check_value(key, value)
            if is_secret_key(key) and not isinstance(value, Secret):
                value = Secret(str(value))
            name = _FIELD_KEYS.get(key)
            if name is None:
                extra.append((key, value))  # type: ignore[arg-type]
            elif name == "sasl_password":
                fields[name] = value
            else:
                if isinstance(value, bool) or not isinstance(value, str | int | float):
                    raise ValueError(f"kafka setting {key}: expected a string")
                fields[name] = str(value)
        if "bootstrap_servers" not in fields:
            fields["bootstrap_servers"] = ""  # the one-line error of __post_init__
        return cls(**fields, extra=tuple(extra))

    # --- using ----------------------------------------------------------------------------------------
    def client_config(self) -> dict[str, Value]:
        """The librdkafka settings of this connection, secrets revealed: only for a client's constructor."""
        conf: dict[str, Value] = {}
        for key, value in self._items():
            conf[key] = value.reveal() if isinstance(value, Secret) else value
        return conf

    def settings(self) -> dict[str, Value | Secret]:
        """The librdkafka settings with secrets still as ``Secret`` (safe to print)."""
        return dict(self._items())

    def redact(self, text: str) -> str:
        """``text`` with every secret value of this connection masked."""
        for _, value in self._items():
            if isinstance(value, Secret):
                text = value.redact(text)
        return text

    def __str__(self) -> str:
        if self.security_protocol == "PLAINTEXT":
            return self.bootstrap_servers
        return f"{self.bootstrap_servers} ({self.security_protocol})"

    def _sasl_items(self) -> list[tuple[str, object]]:
        return [
            ("sasl.mechanism", self.sasl_mechanism),
            ("sasl.username", self.sasl_username),
            ("sasl.password", self.sasl_password),
        ]

    def _items(self) -> list[tuple[str, Value | Secret]]:
        items: list[tuple[str, Value | Secret]] = [
            ("bootstrap.servers", self.bootstrap_servers),
            ("security.protocol", self.security_protocol),
        ]
        items += [(k, v) for k, v in self._sasl_items() if v is not None]  # type: ignore[misc]
        if self.ssl_ca_location is not None:
            items.append(("ssl.ca.location", self.ssl_ca_location))
        return items + list(self.extra)


# librdkafka key -> KafkaConnection field, for the keys with a field of their own.
_FIELD_KEYS = {
    "bootstrap.servers": "bootstrap_servers",
    "security.protocol": "security_protocol",
    "sasl.mechanism": "sasl_mechanism",
    "sasl.mechanisms": "sasl_mechanism",  # librdkafka's alias
    "sasl.username": "sasl_username",
    "sasl.password": "sasl_password",
    "ssl.ca.location": "ssl_ca_location",
}
