"""Reading other projects' checkpoints into jaxchat models."""
