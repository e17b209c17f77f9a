"""Inspection: report(), diff(), DOT and networkx views, built from the passes' own records."""
