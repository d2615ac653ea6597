"""Outbound delivery: next-hop resolution, SMTP client and the delivery router."""
