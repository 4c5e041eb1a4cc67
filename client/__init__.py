"""Steps 1-3, at a site: its data -> local DP fine-tune -> noised error summary (one ClientApp per SuperNode)."""
