"""Contracts every step shares: config, message format, the typed round, model, summary contract, store."""
