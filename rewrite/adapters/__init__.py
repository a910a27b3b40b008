"""The adapter layer methods build on: target selection, branch sites and their fold, low-rank branches
(PEFT's LORA family) and embedding lookups, slots, prompt tables, PEFT adapter files and their arithmetic."""
