"""Step 5 -> readers: the Streamlit dashboard over the run store (no Flower, no torch)."""
