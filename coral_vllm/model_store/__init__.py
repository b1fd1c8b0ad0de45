"""Targets and drafters on disk: fetch and convert targets, the default drafter."""
