"""Recipes: applications built on the engine (capture, passes, train, export), not part of it.

`pet` is Pattern-Exploiting Training (PVP files, zero-shot, PET, iPET, distillation); `demo` is the
whole flow on MiniLM and SST-2 behind `rewrite demo`. Recipes may use anything below them; nothing
in the engine or the passes imports a recipe.
"""
