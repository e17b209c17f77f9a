"""Rewrite passes, one per file, each `verb_noun(gm, ctx) -> PassResult`."""
