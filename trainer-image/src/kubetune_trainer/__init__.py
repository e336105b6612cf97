"""KubeTune data plane: train, export and serve (runs in pods and in local mode)."""
