"""Where models and text come from: checkpoints (local, hub, GGUF), the registry's named models and their fetch, the
hub's reachability, and the text turned into token ids (with the packaged WikiText)."""
