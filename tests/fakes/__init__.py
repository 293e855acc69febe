"""Fakes of cloud control planes that speak each provider's real wire protocol on loopback."""
