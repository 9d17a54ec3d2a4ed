"""Certificates for the webhook: a CA and serving certificates, their installation and rotation."""
