"""Built-in Jinja chat templates (chatml, llama3, plain), loaded by `pipeline.templates`."""
