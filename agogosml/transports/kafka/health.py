"""Broker connectivity of a librdkafka client: readiness and quiet logging."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from confluent_kafka import KafkaError

from agogosml.config import KafkaSettings

logger = logging.getLogger(__name__)

#: How often librdkafka reports statistics, and so how fast readiness follows
#: the broker connection.
STATS_INTERVAL_MS = 2000


#: Minimum time between two log lines of one Kafka error code, in seconds.
ERROR_LOG_INTERVAL_SECONDS = 60.0

#: Hints for errors that come from the client's own settings, by error code.
_ERROR_HINTS = {
    KafkaError._AUTHENTICATION: (
        "check KAFKA_SECURITY_PROTOCOL against the broker's listener, and "
        "KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
    ),
    KafkaError._SSL: (
        "check KAFKA_SECURITY_PROTOCOL and KAFKA_SSL_CA_LOCATION against the "
        "broker's certificate"
    ),
    KafkaError.INVALID_SESSION_TIMEOUT: (
        "the consumer's session.timeout.ms, set in KAFKA_EXTRA_CONFIG, is outside "
        "the range of the broker's group.min.session.timeout.ms and "
        "group.max.session.timeout.ms (6 s and 30 min unless the broker sets "
        "them); the reader cannot join its group until it is changed"
    ),
}


def authentication_hint(settings: KafkaSettings) -> str:
    """Return the fix of a failed SASL login, naming the user and mechanism used."""
    if settings.eventhubs_connection_string.get_secret_value():
        return (
            "the PLAIN login of user $ConnectionString failed: check "
            "KAFKA_EVENTHUBS_CONNECTION_STRING against the namespace's Shared "
            "access policies"
        )
    if settings.sasl_mechanism is None:
        return _ERROR_HINTS[KafkaError._AUTHENTICATION]
    mechanism = settings.sasl_mechanism.value
    return (
        f"the {mechanism} login of user {settings.sasl_username!r} failed: check "
        "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD, and that the broker has "
        f"{mechanism} credentials for this user and enables {mechanism} "
        "(KAFKA_SASL_MECHANISM) on the listener"
    )


class BrokerHealth:
    """Track whether a client can reach a broker, from its statistics and errors.

    The client is up once a statistics report shows a broker connection in state
    ``UP``. It is down after an all-brokers-down or fatal error, until a later
    report shows a connection again (librdkafka reconnects by itself). A report
    without connections does not mark it down, because librdkafka may close idle
    connections on purpose.

    NOTE: checked against Apache Kafka only; Azure Event Hubs, which closes idle
    connections, is not tested here.

    Args:
        client: Kind of client in messages, such as ``producer``.
        bootstrap_servers: Brokers named in messages.
        authentication_hint: Fix of a failed SASL login, from
            `authentication_hint`. The default names the settings only.
    """

    def __init__(
        self,
        client: str,
        bootstrap_servers: str,
        *,
        authentication_hint: str | None = None,
    ) -> None:
        self._client = client
        self._bootstrap_servers = bootstrap_servers
        self._hints = dict(_ERROR_HINTS)
        if authentication_hint is not None:
            self._hints[KafkaError._AUTHENTICATION] = authentication_hint
        self._unreachable_logged = False
        self.up = False
        self.fatal = False
        #: Whether all brokers were reported down since the last connection.
        self._brokers_down = False
        #: Text of the last connection or fatal error, for error responses.
        self.last_error = ""
        #: The last error that the client's own settings cause, with its fix,
        #: until a connection is up: a later "all brokers down" hides its cause.
        self.settings_error = ""
        self._error_logged_at: dict[int, float] = {}
        self._errors_not_logged: dict[int, int] = {}

    def on_statistics(self, stats: dict[str, Any]) -> None:
        """Update from one parsed statistics report."""
        brokers = stats.get("brokers", {}).values()
        if self.fatal or not any(broker.get("state") == "UP" for broker in brokers):
            return
        if not self.up:
            logger.info("kafka %s connected", self._client)
        self.up = True
        self._brokers_down = False
        self._unreachable_logged = False
        self.settings_error = ""

    def confirm_connected(self, *, buffered: bool = False) -> None:
        """Mark the client up on proof of a connection, before its next statistics.

        A partition assignment or a fetched message shows that a broker
        responded. Statistics come only every `STATS_INTERVAL_MS`, so without
        this a client stopped within that time would count as never connected.
        A `buffered` proof, such as a message, may have been fetched before
        the brokers went down, so it counts only while they are not known to
        be down.
        """
        if self.up or self.fatal or (buffered and self._brokers_down):
            return
        logger.info("kafka %s connected", self._client)
        self.up = True
        self._brokers_down = False

    def on_error(self, error: KafkaError) -> None:
        """Update from an error callback, logging the error."""
        if error.fatal():
            self.last_error = error.str()
            self.fatal = True
            self.up = False
            logger.error("kafka %s failed for good: %s", self._client, error)
            return
        if error.code() in self._hints:
            self.settings_error = f"{error.str()}; {self._hints[error.code()]}"
        if error.code() not in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._log_error(error)
            return
        self.last_error = error.str()
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.up = False
            self._brokers_down = True
        # librdkafka reports every failed reconnect; one line per outage is enough.
        if not self._unreachable_logged:
            self._unreachable_logged = True
            if self.settings_error:
                logger.error(
                    "kafka %s cannot connect to the brokers at %s (%s): the "
                    "connection failed with %s. Retrying in the background",
                    self._client,
                    self._bootstrap_servers,
                    error.str(),
                    self.settings_error,
                )
                return
            logger.error(
                "kafka %s cannot reach the brokers at %s (%s); check "
                "KAFKA_BOOTSTRAP_SERVERS and the network. Retrying in the background",
                self._client,
                self._bootstrap_servers,
                error.str(),
            )

    def _log_error(self, error: KafkaError) -> None:
        """Log an error, each error code at most once per interval.

        librdkafka reports some errors, such as a failed SASL handshake, on
        every reconnect, several times a second.
        """
        code = error.code()
        now = time.monotonic()
        last = self._error_logged_at.get(code)
        if last is not None and now - last < ERROR_LOG_INTERVAL_SECONDS:
            self._errors_not_logged[code] = self._errors_not_logged.get(code, 0) + 1
            return
        self._error_logged_at[code] = now
        repeats = self._errors_not_logged.pop(code, 0)
        hint = self._hints.get(code, "")
        logger.error(
            "kafka %s error: %s%s%s",
            self._client,
            error,
            f"; {hint}" if hint else "",
            f" ({repeats} more since the last line)" if repeats else "",
        )

    def describe_down(self) -> str:
        """Return why the client is not up, naming the brokers and the last error."""
        if self.fatal:
            return (
                f"the kafka {self._client} failed for good ({self.last_error}); "
                "restart the service"
            )
        if self.settings_error:
            # librdkafka retries, but the same settings fail the same way.
            return (
                f"the kafka {self._client} cannot connect to the brokers at "
                f"{self._bootstrap_servers} ({self.settings_error}). Retrying "
                "does not help until this is fixed"
            )
        cause = f" ({self.last_error})" if self.last_error else " yet"
        return (
            f"the kafka {self._client} is not connected to the brokers at "
            f"{self._bootstrap_servers}{cause}; retry shortly"
        )

    def config(self, on_statistics: Any = None, on_error: Any = None) -> dict[str, Any]:
        """Return the client properties that feed this tracker.

        `on_statistics` and `on_error`, when given, also get each parsed
        statistics report and each client error.
        """

        def stats_cb(stats_json: str) -> None:
            stats = orjson.loads(stats_json)
            self.on_statistics(stats)
            if on_statistics is not None:
                on_statistics(stats)

        def error_cb(error: KafkaError) -> None:
            if on_error is not None:
                on_error(error)
            self.on_error(error)

        return {
            "statistics.interval.ms": STATS_INTERVAL_MS,
            "stats_cb": stats_cb,
            "error_cb": error_cb,
        }


#: Part of librdkafka's warning about a consumer property given to a producer,
#: or a producer property given to a consumer.
_OTHER_CLIENT_PROPERTY = " property and will be ignored by this "


class RepeatFilter(logging.Filter):
    """Let each librdkafka log facility through at most once per interval.

    librdkafka logs every reconnect attempt; without this a broker outage writes
    dozens of lines a second.
    """

    def __init__(self, interval_seconds: float = 60.0) -> None:
        super().__init__()
        self._interval = interval_seconds
        self._last: dict[tuple[int, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Return whether the record is the first of its kind in the interval.

        Warnings that a property applies to the other kind of client are left
        out: KAFKA_EXTRA_CONFIG configures the consumer and the producers
        alike, so a consumer property in it reaches the producers too.
        """
        args = record.args if isinstance(record.args, tuple) else ()
        facility = args[0] if args else None
        if facility == "CONFWARN" and _OTHER_CLIENT_PROPERTY in str(args[-1]):
            return False
        key = (record.levelno, facility)
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) < self._interval:
            return False
        self._last[key] = now
        return True


def client_logger() -> logging.Logger:
    """Return the logger that librdkafka's own log lines go to, rate-limited."""
    librdkafka = logging.getLogger("agogosml.transports.kafka.librdkafka")
    if not any(isinstance(f, RepeatFilter) for f in librdkafka.filters):
        librdkafka.addFilter(RepeatFilter())
    return librdkafka
