"""Serving: one base model, many adapters, each batch row picks its own."""
