"""Check the image identity in an /etc/tether directory (run on the guest).

The key's public half must be the certificate's, the certificate must be signed by
home's CA, and agent.json's fingerprint and serial must describe them.
"""
import hashlib
import json
import sys

from cryptography import x509
from cryptography.hazmat.primitives import serialization

etc = sys.argv[1]
errors = []
with open(f"{etc}/image.key", "rb") as f:
    key = serialization.load_pem_private_key(f.read(), password=None)
with open(f"{etc}/image.crt", "rb") as f:
    cert = x509.load_pem_x509_certificate(f.read())
with open(f"{etc}/ca.crt", "rb") as f:
    ca = x509.load_pem_x509_certificate(f.read())
with open(f"{etc}/agent.json", encoding="utf-8") as f:
    agent = json.load(f)

der = serialization.Encoding.DER
spki = serialization.PublicFormat.SubjectPublicKeyInfo
key_spki = key.public_key().public_bytes(der, spki)
fingerprint = hashlib.sha256(key_spki).hexdigest()
if fingerprint != agent["fingerprint"]:
    errors.append(f"fingerprint of image.key is {fingerprint}, the bundle says {agent['fingerprint']}")
if cert.public_key().public_bytes(der, spki) != key_spki:
    errors.append("image.crt is not the certificate of image.key")
try:
    cert.verify_directly_issued_by(ca)
except Exception as exc:  # noqa: BLE001 - any failure means "not signed by this CA"
    errors.append(f"image.crt is not signed by ca.crt: {exc!r}")
if cert.serial_number != int(agent["cert_serial"], 16):
    errors.append(f"image.crt has serial {cert.serial_number:x}, the bundle says {agent['cert_serial']}")
if errors:
    sys.exit("the image credential bundle does not hold together: " + "; ".join(errors)
             + ". Issue a new one with `tether-home image issue`.")
print(json.dumps({"fingerprint": fingerprint, "cert_serial": f"{cert.serial_number:x}"}))
