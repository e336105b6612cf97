"""KubeTune control plane: API, planner, operator and CLI."""
