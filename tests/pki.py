"""Certificates made for a test: CAs, server and client certificates, written as PEM files.

    pki = Pki(tmp_path)
    ca = pki.authority("test-ca")
    server = pki.issue(ca, "gateway", hosts=("127.0.0.1", "localhost"))   # .cert, .key: file paths
    client = pki.issue(ca, "client-a", client=True)

EC P-256 keys (fast to make), SHA-256 signatures, valid from an hour ago for a day.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    name: str
    cert: Path
    key: Path
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, certificate: x509.Certificate, key) -> Issued:
        cert_path = self.folder / f"{name}.crt"
        key_path = self.folder / f"{name}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return Issued(name, cert_path, key_path, certificate, key)

    @staticmethod
    def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))

    def authority(self, name: str) -> Issued:
        """A self-signed CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = self._validity(x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                                 .public_key(key.public_key()).serial_number(x509.random_serial_number()))
        builder = (builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        return self._write(name, builder.sign(key, hashes.SHA256()), key)

    def issue(self, ca: Issued, name: str, hosts: tuple[str, ...] = (), client: bool = False) -> Issued:
        """A leaf certificate signed by `ca`: for servers at `hosts` (IP addresses or DNS names),
        or for a client (`client=True`)."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._validity(
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
        )
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()), critical=False)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if hosts:
            names = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return self._write(name, builder.sign(ca.private_key, hashes.SHA256()), key)
