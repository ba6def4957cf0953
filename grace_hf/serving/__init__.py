"""Front ends of a trained retriever: the Gradio app and HTTP API (`app`), the HTML gallery (`gallery`) and the
`transformers.pipeline` task "text-to-image-retrieval" (`pipeline`)."""
