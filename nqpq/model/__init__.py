"""The model adaptation: a causal LM's parts and per-layer geometry, its LM head, the losses, the replay from a
recorded layer, crystallization (the op swapped into the model's attention) and where its modules compute."""
