"""Evaluation: Recall@K (`metrics`, below the dense baseline), evaluating a model on a prepared dataset
(`evaluate`), recall plots (`plots`) and the comparison table (`compare`)."""
