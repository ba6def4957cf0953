"""Evaluation: Recall@K (`metrics`, below the dense baseline), evaluating a model on a prepared dataset
(`evaluate`), recall plots (`plots`), the comparison table (`compare`) and the text-only BM25 baseline
(`text_baseline`)."""
