"""The compiler: one build path from (model, spec, plan) to a rewritten graph."""
