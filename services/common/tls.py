"""TLS between clients and the gateway, and mutual TLS between services, when certificates are set.

Each service has one certificate valid as server and as client (services call each other) and a
CA to check peers with. `python -m services.common.tls DIR` (or `make certs`) writes a throwaway CA
and a certificate per service for local use and tests; deployments mount their own (Secrets).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

SERVICES = ("gateway", "tokenizer", "cache", "shard", "client")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_args(cls, cert: str | None, key: str | None, ca: str | None) -> "TlsFiles | None":
        given = [x for x in (cert, key, ca) if x]
        if not given:
            return None
        if len(given) != 3:
            raise ValueError("TLS needs --tls-cert, --tls-key and --tls-ca together")
        return cls(Path(cert), Path(key), Path(ca))

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())],
                                           root_certificates=self.ca.read_bytes(),
                                           require_client_auth=require_client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(),
                                            private_key=self.key.read_bytes(),
                                            certificate_chain=self.cert.read_bytes())


def make_certs(out: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = 30) -> None:
    """A CA and one certificate per service (server and client auth) for `hosts`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(key, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llm-mesh test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_key(ca_key, out / "ca-key.pem")
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    for service in SERVICES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"llmmesh-{service}")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        (out / f"{service}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, out / f"{service}-key.pem")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a throwaway CA and a certificate per service")
    parser.add_argument("out", type=Path)
    parser.add_argument("--hosts", default="localhost,127.0.0.1", help="names the certificates are valid for")
    args = parser.parse_args()
    make_certs(args.out, tuple(h.strip() for h in args.hosts.split(",") if h.strip()))
    print(f"wrote ca.pem and {', '.join(SERVICES)} certificates to {args.out}")


if __name__ == "__main__":
    main()
