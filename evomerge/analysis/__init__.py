"""Pre-flight analysis of the models to merge (`evomerge audit`): task-vector statistics per layer and tensor
kind (`audit`), their heatmap (`heatmap`), and the functional interference probe, which merges and scores
region by region through the candidate evaluator (`probe`)."""
