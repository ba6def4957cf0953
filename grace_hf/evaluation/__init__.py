"""Evaluation: Recall@K and the metrics file (`metrics`, below the dense baseline), the evaluation queries of a
prepared dataset (`queries`, below the retriever), a model's Recall@K over them (`model_recall`), recall plots
(`plots`) and the comparison table (`comparison`)."""
