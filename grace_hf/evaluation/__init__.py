"""Evaluation: Recall@K and the metrics file (`metrics`, below the dense baseline), the evaluation queries of a
prepared dataset (`queries`, below the retriever), a model's Recall@K over them (`model_recall`), recall plots
(`plots`), the comparison table (`comparison`) and the text-only BM25 baseline (`text_baseline`)."""
