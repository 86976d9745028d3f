"""Smart-home intent + slot recognition on the (decoupled) MiniLM encoder: dataset, heads, training, inference."""
