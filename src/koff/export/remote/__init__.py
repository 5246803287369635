"""Model code that `koff export` copies into an exported folder, for `trust_remote_code=True`.

These files import only transformers and torch (never koff), so the folder loads where koff is not
installed. `koff export` writes them with the line `BASE_MODEL_TYPE = "..."` set to the base
model's family; nothing else is changed.
"""
