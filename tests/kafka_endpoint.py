"""A local broker listener that behaves like the Kafka endpoint of Event Hubs.

Event Hubs' Kafka endpoint takes SASL_SSL with the PLAIN mechanism, the user
name ``$ConnectionString`` and the connection string as password. The
listener built here has exactly that: TLS with a certificate for 127.0.0.1
signed by a test CA, and a PLAIN user ``$ConnectionString`` whose password is
`CONNECTION_STRING`. Other TLS listeners reuse `write_tls_files` and
`tls_properties`.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from broker import Listener
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

CONNECTION_STRING = (
    "Endpoint=sb://agogosml-test.servicebus.windows.net/;"
    "SharedAccessKeyName=RootManageSharedAccessKey;"
    "SharedAccessKey=dGVzdC1rZXktZm9yLXRoZS1sb2NhbC1icm9rZXI="
)
KEYSTORE_PASSWORD = "local-test-keystore"
LISTENER = "EVENTHUBS"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: str,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


def write_tls_files(directory: Path) -> tuple[Path, Path]:
    """Write a test CA (PEM) and a broker keystore (PKCS12) signed by it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate(
        "agogosml test CA", ca_key.public_key(), "agogosml test CA", ca_key, ca=True
    )
    broker_key = ec.generate_private_key(ec.SECP256R1())
    broker_cert = _certificate(
        "127.0.0.1", broker_key.public_key(), "agogosml test CA", ca_key, ca=False
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    keystore_path = directory / "broker.p12"
    keystore_path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"broker",
            broker_key,
            broker_cert,
            [ca_cert],
            serialization.BestAvailableEncryption(KEYSTORE_PASSWORD.encode()),
        )
    )
    return ca_path, keystore_path


def tls_properties(keystore: Path) -> dict[str, str]:
    """Return the listener properties that serve TLS with `keystore`."""
    return {
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": str(keystore),
        "ssl.keystore.password": KEYSTORE_PASSWORD,
        "ssl.key.password": KEYSTORE_PASSWORD,
    }


def eventhubs_listener(keystore: Path) -> Listener:
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_$ConnectionString="{CONNECTION_STRING}";'
    )
    return Listener(
        name=LISTENER,
        host="127.0.0.1",
        protocol="SASL_SSL",
        properties={
            "sasl.enabled.mechanisms": "PLAIN",
            "plain.sasl.jaas.config": jaas,
            **tls_properties(keystore),
        },
    )
