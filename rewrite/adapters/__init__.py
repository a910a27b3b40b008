"""The adapter layer passes build on: PEFT adapter files, adapter slots, low-rank branches and their
merges, prompt tables and per-row gathers."""
