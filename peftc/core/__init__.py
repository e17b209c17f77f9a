"""The vocabulary every stage shares: config field checks, target patterns, atomic file writes (files).

Imports nothing of peftc but `peftc.errors`.
"""
