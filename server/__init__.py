"""Step 4, at the coordinator: collect -> aggregate -> findings -> the run store (the ServerApp)."""
