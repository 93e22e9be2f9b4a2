"""Server-side aggregation as a fold: replies are validated, bounded and folded as they arrive (see folds)."""
